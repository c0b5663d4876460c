"""docs/results.md is generated from the committed results: every row's command, config and results.json exist,
and the file says what they say."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("tables", ROOT / "experiments" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_row_names_a_committed_config_and_results_file():
    manifests = sorted(ROOT.glob("experiments/*/rows.yaml"))
    assert manifests
    for manifest in manifests:
        for row in yaml.safe_load(manifest.read_text())["rows"]:
            assert (ROOT / row["results"]).is_file(), row["results"]
            if row.get("config"):
                assert (ROOT / row["config"]).is_file(), row["config"]
                assert row["config"] in row["command"]
            for key in ("prepare", "then"):  # committed scripts (the experiment's own or shared), run before/after
                if row.get(key):
                    script = shlex.split(row[key])
                    own, shared = f"experiments/{manifest.parent.name}/", "experiments/"
                    assert script[0] == "python" and (script[1].startswith(own) or script[1].count("/") == 1
                                                      and script[1].startswith(shared))
                    assert (ROOT / script[1]).is_file(), row[key]
            args = shlex.split(row["command"])
            assert args[:2] == ["engrain", "compare"] or args[:2] == ["engrain", "demo"], row["command"]
            if args[:2] == ["engrain", "demo"]:  # the demo writes into its workspace; the row says what was copied
                assert row["copied_from"].startswith(args[args.index("-w") + 1] + "/reports/"), row["command"]
            else:
                assert str(Path(row["results"]).parent) in row["command"]  # the command writes that results file


def test_results_doc_is_what_the_results_say():
    tables = _tables()
    assert (ROOT / "docs" / "results.md").read_text() == tables.render(), \
        "docs/results.md is out of date: run python experiments/tables.py"


def test_run_script_prints_each_rows_command():
    import subprocess
    import sys

    for i, row in enumerate(yaml.safe_load((ROOT / "experiments/knowledge/rows.yaml").read_text())["rows"], 1):
        out = subprocess.run([sys.executable, str(ROOT / "experiments/run.py"), "knowledge", str(i), "--print"],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == "\n".join(" ".join(row[k].split()) for k in ("prepare", "command", "then") if row.get(k))
