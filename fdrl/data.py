"""Prompts (contexts) through tensorflow-datasets, with no TensorFlow needed.

A local text file (one prompt per line; the repo ships `fdrl/prompts/*.txt`) is
written once as an `array_record` TFDS dataset and read back with
`tfds.data_source`. Any other TFDS dataset the user has prepared works by name.

    prompts = load_prompts("chat")                      # a shipped prompt set
    prompts = load_prompts("/path/to/my_prompts.txt")   # your own file
    prompts = load_prompts("my_dataset", field="text", split="train")  # a prepared TFDS dataset
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import os
import sys
import threading

from fdrl import file_lock

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


def default_data_dir() -> str:
    return os.environ.get("FDRL_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fdrl", "tfds"))


def shipped_prompt_sets() -> list[str]:
    return sorted(f[:-4] for f in os.listdir(PROMPT_DIR) if f.endswith(".txt"))


def _builder_class():
    import tensorflow_datasets as tfds

    class FdrlPrompts(tfds.core.GeneratorBasedBuilder):
        """Prompts from a local text file, one per line (blank lines skipped)."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, source_file: str | None = None, **kwargs):
            self._source_file = source_file
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self,
                                         features=tfds.features.FeaturesDict({"prompt": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            with open(self._source_file, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            for i, line in enumerate(line for line in lines if line):
                yield i, {"prompt": line}

    return FdrlPrompts


_BUILDER = None
_BUILDER_LOCK = threading.Lock()


def prepare_text_file(path: str, data_dir: str | None = None) -> str:
    """Writes the file as an array_record TFDS dataset (once); returns its data_dir.

    Safe to call from several processes at once (an f sweep launched in parallel shares
    ~/.cache/fdrl/tfds): the first prepares the dataset, the others wait and reuse it.
    """
    global _BUILDER
    if not os.path.exists(path):
        raise FileNotFoundError(f"no prompt file at {path}")
    with open(path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    target_dir = os.path.join(data_dir or default_data_dir(), f"{stem}-{digest}")
    with _BUILDER_LOCK:
        if _BUILDER is None:
            _BUILDER = _builder_class()
    os.makedirs(os.path.dirname(target_dir), exist_ok=True)
    # Without the lock, a second process that checks while the first prepares also prepares,
    # and one of them fails renaming its finished copy onto the other's.
    with file_lock.exclusive(target_dir + ".lock"):
        builder = _BUILDER(source_file=path, data_dir=target_dir, file_format="array_record")
        if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
            _prepare_quietly(builder, path)
    return target_dir


def _prepare_quietly(builder, path: str) -> None:
    """builder.download_and_prepare() with one line of output instead of tfds' own: it prints
    "Downloading and preparing dataset Unknown size (download: Unknown size, ...)" and its
    progress bars, which read as a network download where nothing is fetched. What it printed
    is shown if preparing fails."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            builder.download_and_prepare()
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    print(f"prompts: {path} written once as an array_record TFDS dataset under {builder.data_dir}", flush=True)


def load_prompts(source: str, *, split: str = "train", field: str = "prompt", data_dir: str | None = None,
                 limit: int | None = None) -> list[str]:
    """Prompts as a list of strings.

    Args:
      source: a shipped prompt set name (see `shipped_prompt_sets()`), a path to a
        text file, or the name of a TFDS dataset prepared under data_dir (TFDS' own
        default, ~/tensorflow_datasets, where None). Nothing is downloaded: a dataset
        that is not prepared there is an error.
      split, field: for TFDS datasets, which split and which text feature.
      limit: keep the first `limit` prompts.
    """
    import tensorflow_datasets as tfds

    path = os.path.join(PROMPT_DIR, source + ".txt") if source in shipped_prompt_sets() else source
    if path.endswith(".txt") or os.path.isfile(path):
        target_dir = prepare_text_file(path, data_dir)  # also registers "fdrl_prompts" with tfds
        source_ds = tfds.data_source("fdrl_prompts", data_dir=target_dir, split="train")
    else:
        try:
            # download=False: tfds would otherwise try to fetch and prepare a known dataset
            # (minutes of retries offline) where the user has not prepared it.
            source_ds = tfds.data_source(source, data_dir=data_dir, split=split, download=False)
        except Exception as e:  # tfds raises several kinds for a missing dataset or split
            raise ValueError(_unknown_source_message(source, split, data_dir, e)) from None
    n = len(source_ds) if limit is None else min(limit, len(source_ds))
    out = []
    for i in range(n):
        example = source_ds[i]
        if field not in example:
            raise ValueError(f"prompt source {source!r} has no field {field!r}; its fields are {sorted(example)}")
        value = example[field]
        out.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    if not out:
        raise ValueError(f"prompt source {source!r} has no prompts")
    return out


def _unknown_source_message(source: str, split: str, data_dir: str | None, error: Exception) -> str:
    """What was looked for, tfds' reason in one line (not its list of every dataset it knows),
    and the shipped sets whose names are close to `source`."""
    reason = str(error).strip().splitlines()[0].strip("\"'").rstrip(".") if str(error).strip() else type(error).__name__
    close = difflib.get_close_matches(source, shipped_prompt_sets(), n=2)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"prompt source {source!r} is neither a shipped set {shipped_prompt_sets()}, nor a text file, "
            f"nor a TFDS dataset with split {split!r} prepared in data_dir={data_dir!r} "
            f"(nothing is downloaded): {reason}{hint}")
