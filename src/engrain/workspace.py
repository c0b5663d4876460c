"""The workspace folder: every stage reads the previous stage's files here and writes its own.

    WORKSPACE/
      engrain.yaml      the run's config
      corpus/           documents.jsonl, chunks.jsonl
      synth/            <strategy>.jsonl (append-only)
      memories/<name>/  trained adapters, prefixes, memory layers
      index/            LanceDB
      reports/<bench>/  results.json, report.md, report.html, *.png
"""

from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKSPACE = Path("engrain-workspace")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: Path | str | None) -> "Workspace":
        return cls(Path(root or DEFAULT_WORKSPACE).expanduser().resolve())

    @property
    def config_path(self) -> Path:
        return self.root / "engrain.yaml"

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def documents_path(self) -> Path:
        return self.corpus_dir / "documents.jsonl"

    @property
    def chunks_path(self) -> Path:
        return self.corpus_dir / "chunks.jsonl"

    @property
    def synth_dir(self) -> Path:
        return self.root / "synth"

    @property
    def memories_dir(self) -> Path:
        return self.root / "memories"

    def memory_dir(self, name: str) -> Path:
        return self.memories_dir / name

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def ensure(self) -> "Workspace":
        self.root.mkdir(parents=True, exist_ok=True)
        return self
