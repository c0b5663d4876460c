"""The run's configuration: plain values in one pydantic model, saved as WORKSPACE/engrain.yaml.

Each stage owns one section. CLI flags override what the file says; the file records what was used.
"""

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .atomic import write_text
from .errors import EngrainError
from .memory.kinds import canonical, trained_help


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Section):
    name: str | None = Field(None, description="base model spec; None = the embedded SmolLM2-135M-Instruct")
    device: str | None = None
    dtype: str = "auto"
    decode_weights: str = Field("auto", description="what decode steps read: int4 (4-bit groups where the weights "
                                                    "already are 4-bit, as a Q4 GGUF's are; int8 rows elsewhere), "
                                                    "int8 (a quantized copy of the linear layers), model (its own "
                                                    "weights); auto: int4 on a CPU that computes bf16 natively when "
                                                    "dtype is auto")
    compile_decode: bool = Field(False, description="run quantized decode steps through torch.compile: faster "
                                                    "after a compile on the first step (bench/bench_compiled_decode.py"
                                                    " measures both); needs a C++ compiler")
    prefill_dtype: str = Field("auto", description="what a bf16 model's prompts (and decode steps of many rows) "
                                                   "multiply in on a CPU, through a packed copy of the linear layers: "
                                                   "bfloat16, float32 (twice the copy's memory), int8 (W8A8 "
                                                   "products: each token's input rounded to int8; engrain doctor's "
                                                   "int8_speedup says what they gain here), or auto: float32 where "
                                                   "bf16 products measure clearly slower than fp32's, else bfloat16 "
                                                   "(engrain doctor shows what auto picks here; "
                                                   "bench/bench_prefill_dtype.py times them)")


class IngestConfig(Section):
    source: str | None = Field(None, description="the folder last ingested (recorded by `engrain ingest`)")
    # 128, not 256: rag answered as many questions or more from three chunks of 128 tokens on three of four dev sets,
    # from about two fifths fewer prompt tokens, and LoRA trained on them learned more (experiments/retrieval's
    # chunk-size rows).
    chunk_tokens: int = Field(128, description="chunk size in tokens of the model's tokenizer")
    chunk_overlap: int = Field(16, description="tokens of whole sentences shared by consecutive chunks")
    include: list[str] = Field(default_factory=list, description="globs to keep (all supported files when empty)")
    exclude: list[str] = Field(default_factory=list, description="globs to leave out ('drafts/**', '*.json')")
    max_file_mb: float = Field(50.0, description="files larger than this are reported and skipped")
    json_text_field: str = Field("text", description="field holding the text in .json/.jsonl records")
    skip_hidden: bool = Field(True, description="skip files and folders whose name starts with '.'")
    workers: int = Field(0, ge=0, description="processes parsing files when there are many; 0: one per spare "
                                              "core (none on a 2-core machine), 1: no pool")


class SynthConfig(Section):
    # The model-free strategy by default: the embedded 135M model keeps few of its own questions and rephrasings
    # and takes minutes per round (bench/bench_synth.py); add qa, rephrase, implications, entities with a
    # stronger --generator.
    strategies: list[str] = Field(default_factory=lambda: ["facts"])
    generator: str | None = Field(None, description="http(s)://... = OpenAI-compatible server; else a model spec; "
                                                    "None = the base model")
    generator_model: str | None = Field(None, description="model name sent to an HTTP generator")
    seed: int = 0
    per_chunk: int = Field(4, ge=0, description="accepted items per chunk per model-made strategy")
    facts_per_chunk: int = Field(16, ge=0, description="cap on the question items per chunk (before wordings), taken one "
                                                        "sentence at a time; statements are always kept")
    facts_orders: int = Field(2, ge=0, le=8, description="the chunk again as written and with its self-contained "
                                                         "sentences in this many shuffled orders (0: neither)")
    # le: the item's own wording and synth.facts.WORDINGS
    facts_wordings: int = Field(1, ge=1, le=5, description="instruction wordings of each sentence-completion fact "
                                                           "item; more help a memory layer answer in other words "
                                                           "(docs/experiments.md)")
    facts_questions: int = Field(2, ge=0, le=4, description="wh-questions per sentence, asked as people ask (\"... "
                                                             "founded in what year?\"), answered by the statement")
    # off: experiments/knowledge's acme-demo-short-answers row measured it (fewer facts bound, in either wording)
    facts_short_answers: bool = Field(False, description="answer the wh-questions with the asked name, number or date "
                                                         "alone instead of the whole statement")
    # off until experiments/knowledge measures it (the acme-demo-fronted row)
    facts_fronted: bool = Field(False, description="ask each fact's wh-questions a second time with the wh-phrase in "
                                                   "front and the verb inverted (\"In what year did ... move?\"), "
                                                   "where the sentence allows it")
    # off until experiments/knowledge measures it (the acme-demo-spelled-numbers row)
    facts_spelled_numbers: bool = Field(False, description="ask about numbers written as words (\"nine years\") as "
                                                           "about digits: blanks and wh-questions")
    # off until experiments/knowledge measures it (the acme-demo-bare-questions row)
    facts_bare_questions: bool = Field(False, description="ask the wh-questions without the \"Subject: \" their "
                                                          "statement was prefixed with, as a person asks")
    # off until experiments/knowledge measures it (the acme-demo-reworded row)
    facts_reworded: bool = Field(False, description="ask each wh-question again with up to two words replaced by "
                                                    "WordNet synonyms, as people word a fact differently")
    # 1, not more: experiments/knowledge's open-book rows measured the gain, each sentence costs two chunks of context
    facts_reading: int = Field(1, ge=0, le=8, description="sentences per chunk also trained open-book: continued and "
                                                          "asked with the chunk and a similar one in the prompt, as "
                                                          "retrieval shows them, so the memory learns to read them too")
    # off: experiments/knowledge's hotpot30-polar row measured it (the yes/no answers came back; the hybrid answered
    # fewer of the other questions on that one seed)
    facts_polar: int = Field(0, ge=0, le=8, description="sentences per chunk also asked as yes/no questions: once as "
                                                        "stated (answered \"Yes.\" and the statement) and once with "
                                                        "a fact swapped for another of its kind (\"No.\" and the "
                                                        "statement)")
    facts_about: int = Field(0, ge=0, le=16, description="entity-centred items: each name the statements give, asked "
                                                         "about and answered with up to this many of them (0: off)")
    max_rounds: int = Field(3, ge=1, description="generation rounds per chunk before it is reported under-covered")
    chunks_per_batch: int = Field(8, ge=1, description="chunks synthesised (and written) together")
    batch_size: int = Field(32, ge=1, description="local generator batch size")
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    grounding: str = Field("strict", pattern="^(off|lenient|strict)$")
    dedup_threshold: float = Field(0.8, gt=0.0, le=1.0)
    leak_mode: str = Field("source", pattern="^(source|strict)$")
    leak_ngram: int = Field(8, ge=3)
    concurrency: int = Field(8, ge=1, description="parallel requests to an HTTP generator")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)
    price_in_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens, for the cost counter")
    price_out_per_mtok: float = Field(0.0, ge=0)


class TrainConfig(Section):
    """How `engrain train` trains a parametric memory (see the engrain/train package for what each step does)."""

    memory: str = Field("lora", description=f"the kind trained: {trained_help()}")
    name: str | None = Field(None, description="folder under memories/; default: the memory's name")
    seed: int = 0
    # length of the run: max_steps wins over epochs; max_minutes cuts either to what fits
    max_steps: int | None = None
    epochs: float = 3.0
    max_minutes: float | None = Field(None, gt=0, description="training time the run must fit: once its first steps "
                                                               "are timed, the steps (and the learning-rate decay "
                                                               "with them) are cut, never added, to fit at that pace; "
                                                               "None: every planned step")
    # optimisation; lr None = the memory's default (lora 1e-3, full 3e-5, ...)
    lr: float | None = None
    warmup_steps: int | None = Field(None, description="None: 5% of the steps")
    min_lr_ratio: float = Field(0.1, description="cosine decays to lr * min_lr_ratio")
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # batches: a row holds up to pack_tokens (or seq_len) tokens of packed examples; global batch =
    # micro_batch * grad_accum * processes rows
    seq_len: int = Field(1024, description="the longest example trained, in tokens (longer ones are cut)")
    # Fewer tokens per row mean more optimizer steps for the same tokens; experiments/knowledge's seq-512 and pack-512
    # rows measure what that is worth.
    pack_tokens: int | None = Field(None, ge=1, description="tokens packed into one row (None: the memory's own "
                                                           "default, else seq_len); an example longer than this "
                                                           "trains alone in its row")
    micro_batch: int = 1  # one packed row: more updates for the same compute
    grad_accum: int = 1
    packing: bool = True
    bf16: str = Field("auto", description="auto (only where bf16 is native and measured faster than fp32) | on | off")
    # validation, checkpoints, early stopping
    val_fraction: float = Field(0.1, description="share of facts whose questions are held out for validation")
    val_max: int = 64
    eval_every: int | None = Field(None, description="steps between validations; None: four times per epoch")
    save_every: int = 50
    keep_checkpoints: int = 2
    early_stopping_patience: int = Field(0, description="stop after this many evals without improvement; 0 = off")
    keep_best: bool = Field(True, description="save the weights of the best validation (held-out facts answered, "
                                              "then loss) instead of the last")
    keep_best_p: float | None = Field(None, ge=0, le=1,
                                      description="with keep_best, an earlier evaluation's weights replace the last "
                                                  "step's only when it answered more held-out questions than the last "
                                                  "at McNemar's exact p at or below this; None: any better score, "
                                                  "however small the lead")
    # replay against forgetting
    replay_share: float = Field(0.3, description="share of general data in the training mix (0 = none); experiments/knowledge measures what it keeps and costs")
    replay_sources: list[str] | None = Field(None, description="self_distill (the base model's answers to general "
                                                             "requests), self_prose (its continuations of general "
                                                             "prose openings), self_qa (its answers to short "
                                                             "general-knowledge questions) and self_questions (its "
                                                             "answers to questions it wrote itself), each an equal "
                                                             "share of the replay unless replay_shares weighs "
                                                             "them (None: the memory kind's default; "
                                                             "LoRA self_distill and self_prose, the others "
                                                             "self_distill); experiments/knowledge measures them")
    replay_shares: list[float] | None = Field(None, description="each replay source's share of the replay, in "
                                                             "the order of replay_sources (None: equal shares); "
                                                             "experiments/knowledge's prose-share rows measure it")
    replay_max_new_tokens: int = 96
    replay_prompts: int | None = Field(None, ge=1, description="self-distillation replays the first N of the general "
                                                               "prompts engrain ships (None: as many as the mix "
                                                               "draws, up to all of them)")
    # Every document item ends its answer after a sentence or two. Whether that teaches a memory to stop early on
    # general questions too was measured in experiments/knowledge (the no-item-end row): it did not, so it stays on.
    item_end_loss: bool = Field(True, description="train the end of turn after the documents' chat answers (False: "
                                                  "only replay teaches where answers end)")
    replay_kl: float = Field(1.0, ge=0.0, le=1.0, description="weight of the KL to the base model's own distribution "
                                                              "on replay tokens (0: next-token loss on them only)")
    # The tokens that carry a fact (a name, number or date the prompt does not already hold) are a few of an
    # answer's tokens; the rest restate the question. experiments/knowledge measures weighting them up.
    fact_weight: float = Field(1.0, ge=0.0, description="loss weight of the document items' answer tokens that "
                                                        "state a name, number or date their prompt does not hold "
                                                        "(1: every token alike)")
    # distillation: the base model with the item's source chunks in the prompt is the teacher (see train/distill.py)
    distill: float = Field(0.0, ge=0.0, le=1.0, description="weight of the distillation loss against the next-token "
                                                             "loss (0 = off, 1 = distillation alone)")
    distill_top_k: int = Field(32, ge=1, description="teacher tokens kept per position")
    distill_hidden: float = Field(0.0, ge=0.0, description="weight of matching the teacher's hidden states at a few "
                                                          "blocks on the answer tokens (L1 relative to the teacher's "
                                                          "scale, added to the loss; 0 = off)")
    # `engrain update`: a trained memory taught the documents added or changed since it was trained
    update_epochs: float = Field(2.0, gt=0, description="passes over the new and changed documents' items")
    # Training on the new items alone pulls the weights toward them and overwrites what the memory knew; mixing
    # in a sample of its earlier items (rehearsal) keeps those facts in the gradient while the new ones are learnt.
    update_rehearsal: float = Field(0.5, ge=0.0, lt=1.0, description="share of the update's items drawn from the "
                                                                     "documents the memory already learned")
    # LoRA
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str = Field("all-linear", description="all-linear or comma-separated module names")
    # A LoRA that cannot read the input directions general text uses most leaves the base model's answers from them
    # as they were (train/null_space.py); experiments/knowledge's null-space rows measure what that keeps and costs.
    lora_null_share: float = Field(0.0, ge=0.0, lt=1.0, description="share of each LoRA layer's input directions, "
                                                                    "those the replay's inputs use most, that the "
                                                                    "adapter is kept from reading (0: off)")
    lora_null_relative: bool = Field(False, description="rank those directions by the replay's input energy "
                                                        "relative to the documents' items' (false: by the "
                                                        "replay's alone)")
    # LoRA+ (Hayou et al. 2024): B starts at zero and A at random, so at one learning rate B moves slowly; LoRA+
    # trains B at a larger rate than A. experiments/knowledge's lora-plus rows measure it, alone and with the
    # self-prose replay that is LoRA's default beside it.
    lora_plus_ratio: float = Field(4.0, gt=0, description="learning rate of the LoRA B matrices over that of A "
                                                          "(1: one rate for both)")
    # An exponential moving average of the trainable weights (Polyak averaging) smooths the last steps' noise out of
    # what is kept; experiments/knowledge's ema rows measure whether it answers more or steadier.
    ema_horizon: float = Field(0.0, ge=0.0, le=1.0, description="the weights evaluated and kept are an exponential "
                                                               "moving average spanning about this share of the "
                                                               "run's steps (0: the trained weights themselves)")
    # settings of other memories, by memory name (e.g. options.prefix.length)
    options: dict[str, dict] = Field(default_factory=dict)

    @field_validator("memory")
    @classmethod
    def _current_kind_name(cls, value: str) -> str:
        return canonical(value)  # a renamed kind still works from an old engrain.yaml, with a notice

    @field_validator("options")
    @classmethod
    def _current_option_names(cls, value: dict[str, dict]) -> dict[str, dict]:
        return {canonical(name): opts for name, opts in value.items()}

    @model_validator(mode="after")
    def _rows_within_seq_len(self) -> "TrainConfig":
        if self.pack_tokens is not None and self.pack_tokens > self.seq_len:
            raise ValueError(f"pack_tokens ({self.pack_tokens}) is above seq_len ({self.seq_len}): a row packs at "
                             "most seq_len tokens; lower pack_tokens or raise seq_len")
        return self


class RagConfig(Section):
    """Retrieval for `rag` and `X+rag` (chunk size itself is ingest.chunk_tokens)."""

    embedding_model: str | None = Field(None, description="sentence-transformers name or folder; None = the "
                                                          "embedded all-MiniLM-L6-v2")
    # 3, not 4: the embedded model answered as many or more from three chunks on all four dev sets, from about a
    # fifth fewer prompt tokens (experiments/retrieval); 2 answered more on three of them and fewer of acme's
    # two-document questions.
    top_k: int = Field(3, ge=1, description="chunks put in the prompt per question (experiments/retrieval measures "
                                            "the choice)")
    mode: str = Field("hybrid", pattern="^(hybrid|vector|bm25)$")
    candidates: int = Field(20, ge=1, description="hits taken from each retriever before fusion")
    rrf_k: int = Field(60, ge=1, description="reciprocal rank fusion constant: score = sum 1 / (rrf_k + rank)")
    vector_weight: float = Field(1.0, ge=0.0, description="weight of the vector ranking in the fusion")
    bm25_weight: float = Field(1.0, ge=0.0, description="weight of the BM25 ranking in the fusion")
    rewrite_query: bool = Field(False, description="let the model rewrite each question into a search query "
                                                   "(fused with the original)")
    draft_query: bool = Field(False, description="the model first answers each question without retrieval; the "
                                                 "question with that draft is searched too (fused with the "
                                                 "original): a trained memory's draft names what it learned")
    # fused, not read: with the base model reading the chunks the hybrid answered more than with the memory reading
    # them on acme (two memories) and fictional-dev, as much within the noise on squad-dev, and more than rag with
    # every memory (experiments/retrieval's fused rows); 0.5 answered more than 1 on acme.
    hybrid: str = Field("fused", pattern="^(read|fused)$",
                        description="how a hybrid (lora+rag, ...) answers: 'fused', the base model reads the chunks "
                                    "and each token adds what training changed about the closed-book answer "
                                    "(models/fused.py); 'read', the trained memory reads the chunks itself")
    fused_weight: float = Field(0.5, ge=0.0, description="rag.hybrid fused: the weight of what training changed "
                                                         "against the base model's reading of the chunks")
    ann_min_rows: int = Field(5000, ge=1, description="build an IVF_SQ vector index from this many chunks on")
    nprobes: int = Field(20, ge=1, description="IVF partitions searched per query")


class AnswerConfig(Section):
    """How trained memories answer (engrain/memory/gate.py)."""

    gate: bool = Field(True, description="a trained memory answers the questions close to its documents; the "
                                         "base weights answer the rest, so what training wore away is not lost "
                                         "to them (false: the trained weights answer everything)")
    gate_general_share: float = Field(0.05, ge=0.0, le=1.0, description="share of the general replay requests the "
                                                                        "calibrated gate lets through to the "
                                                                        "trained weights")


class EngrainConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rag: RagConfig = Field(default_factory=RagConfig)
    answer: AnswerConfig = Field(default_factory=AnswerConfig)


def load_config(path: Path) -> EngrainConfig:
    """The config at ``path``, or the defaults when it does not exist; a clear error when it is invalid."""
    if not path.exists():
        return EngrainConfig()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise EngrainError(f"{path}: not valid YAML ({exc}).", hint="Fix the file or delete it to use defaults.") from exc
    try:
        return EngrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise EngrainError(f"{path}: invalid config: {problems}.", hint="Fix those fields or delete them.") from exc


def save_config(config: EngrainConfig, path: Path) -> None:
    write_text(path, yaml.safe_dump(config.model_dump(), sort_keys=False))


def apply_settings(path: Path, settings_file: Path) -> EngrainConfig:
    """Merge the sections and fields ``settings_file`` names into the config at ``path`` and save it: how a
    committed experiment config (a partial engrain.yaml) sets up a workspace before anything is built. Fields it
    does not name keep the workspace's values (the defaults in a fresh one)."""
    if not settings_file.is_file():
        raise EngrainError(f"{settings_file}: no such settings file.", hint="Pass a YAML file laid out like "
                                                                            "engrain.yaml (sections and fields).")
    try:
        extra = yaml.safe_load(settings_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise EngrainError(f"{settings_file}: not valid YAML ({exc}).", hint="Fix the file.") from exc
    if not isinstance(extra, dict):
        raise EngrainError(f"{settings_file}: expected sections such as 'train:' at the top level.")
    merged = load_config(path).model_dump()
    for section, fields in extra.items():
        if isinstance(fields, dict) and isinstance(merged.get(section), dict):
            merged[section].update(fields)
        else:
            merged[section] = fields
    try:
        config = EngrainConfig.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise EngrainError(f"{settings_file}: invalid settings: {problems}.", hint="Fix those fields.") from exc
    save_config(config, path)
    return config
