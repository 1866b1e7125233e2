"""The run directory: every file a distillation run reads back, each written atomically, each read with a one-line
error that names the file and the fix.

    RUN/run.json           what the run is of: teacher (source + config hash), data (source + fingerprint), init;
                           a re-run with another one is refused, naming the field
    RUN/init/              the initialized student (HF layout), init.json, eval.json (its held-out perplexity)
    RUN/stageK/            spec.json (the stage's settings + where it starts from), metrics.jsonl (one row per step;
                           a torn last line from a kill is ignored), resume/ while running (DCP), config.json +
                           model.safetensors + tokenizer when finished, loss.png, DONE.json (the summary; written
                           last: its presence means finished)
    RUN/eval.json          `distill all`: the final teacher vs student comparison
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llamba.atomic import atomic_dir, atomic_write, clean_stale, recover_dir
from llamba.errors import LlambaError

RUN_FILE = "run.json"
IDENTITY_FLAGS = {
    "teacher": "--teacher",
    "teacher_config": "--teacher",
    "data": "--data",
    "data_fingerprint": "--data",
    "text_field": "--text-field",
    "init": "--init",
    "qk_heads": "--qk-heads",
}


class RunError(LlambaError, ValueError):
    """Bad run directory, checkpoint or settings; the one-line message names the file and field."""


def read_json(path: Path, fix: str) -> dict:
    """A JSON file of the run; an empty or corrupt one raises RunError naming it and `fix`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        return json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = (
            "is empty"
            if isinstance(e, json.JSONDecodeError) and not text.strip()
            else f"is corrupt ({type(e).__name__}: {str(e).splitlines()[0]})"
        )
        raise RunError(f"{path} {why}; {fix}") from None


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    atomic_write(path, json.dumps(obj, indent=indent))


# --------------------------------------------------------------------------------------------------
# Identity of a run: teacher, data, init
# --------------------------------------------------------------------------------------------------
def config_hash(config) -> str:
    """A short hash of a model config (transformers PretrainedConfig or dict), ignoring load-time fields (dtype,
    attention implementation, name/path, library version)."""
    raw = config if isinstance(config, dict) else config.to_dict()
    drop = {"dtype", "torch_dtype", "transformers_version", "name_or_path", "architectures"}
    kept = {k: v for k, v in raw.items() if k not in drop and not k.startswith("_")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _local(spec: str) -> Path | None:
    p = Path(spec).expanduser()
    return p.resolve() if p.exists() else None


def source_name(spec) -> str:
    """A teacher or --data spec as recorded: local paths absolute, anything else as given ('default' for none)."""
    if spec in (None, ""):
        return "default"
    local = _local(str(spec))
    return str(local) if local is not None else str(spec)


def data_fingerprint(spec) -> str:
    """Local data: a hash of each file's name, size and first MiB (cheap on large corpora); else '' (a name)."""
    local = _local(str(spec)) if spec not in (None, "") else None
    if local is None:
        return ""
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(local) if local.is_dir() else f.name}:{f.stat().st_size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def data_name(data) -> str:
    """--data as recorded: chat data as `chat:N` whichever way it was named (no --data, chat, teacher:N), so an
    older run dir whose 'default' meant other text is refused instead of resumed on new data."""
    from llamba.distill.data import chat_spec

    n = chat_spec(None if data is None else str(data))
    return f"chat:{n}" if n is not None else source_name(data)


def run_identity(teacher, data, text_field: str, init: str) -> dict:
    """What a run is of. teacher: a distill.teacher.Teacher (its spec string and model config)."""
    return {
        "teacher": source_name(teacher.spec),
        "teacher_config": config_hash(teacher.model.config),
        "data": data_name(data),
        "data_fingerprint": data_fingerprint(data),
        "text_field": text_field,
        "init": init,
    }


def _mismatch(key: str, old: dict, new) -> str:
    """One line: which field of the run changed, and the two ways on."""
    if key == "teacher_config":
        return (
            f"the teacher's config changed since this run started (hash {old[key]}, now {new}); use a new "
            f"--out, or the teacher it was started with ({old.get('teacher')})"
        )
    if key == "data_fingerprint":
        return (
            f"the content of --data {old.get('data')} changed since this run started; use a new --out, or "
            "restore the data it was started with"
        )
    flag = IDENTITY_FLAGS.get(key, f"--{key.replace('_', '-')}")
    return (
        f"this run was started with {flag} {old[key]} (now {new}); use a new --out, or pass "
        f"{flag} {old[key]} to continue it"
    )


class RunDir:
    """RUN/: the run's identity (run.json) and its stages."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise RunError(f"--out {self.root} is a file, not a run directory; choose another --out")

    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def eval_file(self) -> Path:
        return self.root / "eval.json"

    @property
    def init_dir(self) -> Path:
        return self.root / "init"

    def stage(self, k: int) -> StageDir:
        return StageDir(self.root / f"stage{k}", k)

    def check_identity(self, identity: dict, write: bool = True) -> None:
        """Refuse a run directory begun with another teacher, data or init (one line naming the field, the old
        value and the two ways on); record the identity on first use (write: rank 0 only)."""
        if self.run_file.is_file():
            old = read_json(
                self.run_file,
                "delete it only if you are sure the run used this command's teacher "
                "and data, or use a new --out",
            )
            for key, new in identity.items():
                if key in old and old[key] != new:
                    raise RunError(f"{self.run_file}: {_mismatch(key, old, new)}")
            if write and any(k not in old for k in identity):
                write_json(self.run_file, {**identity, **old})
        elif write:
            write_json(self.run_file, identity)


class StageDir:
    """RUN/stageK/: spec.json, metrics.jsonl, resume/, the final checkpoint, DONE.json."""

    def __init__(self, path: str | Path, stage: int | None = None):
        self.path = Path(path)
        self.stage = stage
        self.spec_file = self.path / "spec.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.resume_dir = self.path / "resume"
        self.done_file = self.path / "DONE.json"

    @property
    def name(self) -> str:
        return f"stage {self.stage}" if self.stage is not None else str(self.path)

    def prepare(self) -> list[Path]:
        """Before a run (rank 0): create the folder, undo a checkpoint swap cut by a kill, drop the temporaries
        of killed writers. Returns the removed temporaries."""
        self.path.mkdir(parents=True, exist_ok=True)
        recover_dir(self.resume_dir)
        return clean_stale(self.path)

    # --- state files ----------------------------------------------------------------------------------
    def done(self) -> dict | None:
        if not self.done_file.is_file():
            return None
        return read_json(self.done_file, "delete it to train this stage again")

    def spec(self) -> dict | None:
        if not self.spec_file.is_file():
            return None
        return read_json(
            self.spec_file,
            "delete it (and resume/) to restart this stage with this command's settings, or use a new --out",
        )

    def write_spec(self, spec: dict) -> None:
        write_json(self.spec_file, spec)

    def write_done(self, summary: dict) -> None:
        write_json(self.done_file, summary)

    def metrics(self, limit: int | None = None) -> list[dict]:
        """Rows of metrics.jsonl (the first `limit`); a torn last line (a kill mid-write) is dropped, any other
        bad line names the file."""
        if not self.metrics_file.is_file():
            return []
        lines = [
            x
            for x in self.metrics_file.read_text(encoding="utf-8", errors="replace").splitlines()
            if x.strip()
        ]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break
                raise RunError(
                    f"{self.metrics_file}: line {i + 1} is not JSON; delete the stage folder to train "
                    "it again, or use a new --out"
                ) from None
        return rows[:limit] if limit is not None else rows

    def write_metrics(self, rows: list[dict]) -> None:
        atomic_write(self.metrics_file, "".join(json.dumps(m) + "\n" for m in rows))

    def open_log(self):
        """The metrics file opened for appending (rows written past the last checkpoint are dropped on resume)."""
        return open(self.metrics_file, "a", encoding="utf-8")

    def save_weights(self, student, tokenizer=None) -> None:
        """save_pretrained (and the teacher's tokenizer, so the checkpoint is self-contained) into the stage
        folder, each file moved in atomically, config.json last."""
        with atomic_dir(self.path, mode="merge", last="config.json") as tmp:
            student.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
