"""``VLMDataModule``: validated, indexed records -> rendered samples -> padded batches.

Records are read and checked up front, in ``setup`` (format, roles, placeholders, image paths
and integrity, and a text render that proves the record fits ``max_length`` under the chosen
template), so a bad record is reported before the first step. Rendering with images happens
in the Dataset's ``__getitem__`` (in the loader's workers). Order is a function of
``(seed, epoch)`` only: a ``ResumableSampler`` (``attanchor.data.sampler``; the order a
``DistributedSampler`` seeded with ``seed`` draws, one replica on a single device) whose position
in the epoch is saved in every checkpoint (``state_dict``), so a run resumed from any step
trains on exactly the samples the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from attanchor.data.collate import collate
from attanchor.data.formats import (
    DEFAULT_MAX_IMAGE_PIXELS,
    FORMATS,
    BadRecordError,
    set_max_image_pixels,
)
from attanchor.data.packing import packed_collate
from attanchor.data.records import RecordIndex, RenderedDataset, index_records
from attanchor.data.render import SCOPES, Renderer
from attanchor.data.sampler import ResumableSampler, consumed_in_epoch, grouped_order_fn
from attanchor.data.split import split_mask
from attanchor.data.templates import NAMED_TEMPLATES

log = logging.getLogger(__name__)
POLICIES = ("error", "skip")


# Checked record indexes by (file, mtime, size, rendering settings); immutable, so shared.
_INDEX_CACHE: dict[tuple, tuple[RecordIndex, list[BadRecordError], int]] = {}
_INDEX_CACHE_SIZE = 8


class VLMDataModule(L.LightningDataModule):
    """Train/val/test/predict data for a LLaVA-style model (init args are plain types).

    Args:
        model_path: where the processor (tokenizer + image processor) is loaded from.
        train_file, val_file, test_file, predict_file: LLaVA / messages data, .json or .jsonl.
            ``predict_file`` defaults to ``test_file``; predict renders prompts only (the last
            answer dropped, generation prompt added) and pads on the left.
        image_root: image paths are relative to it (default: each data file's folder).
        format: ``llava`` or ``messages``. template: None (the model's own chat template) or
            a named one (``llava-1.5``, ``tiny-llava-v1``). scope: candidate scope.
        on_bad_record: ``error`` (raise at the first) or ``skip`` (write every skipped record
            with its reason to ``rejects_file``, default ``<trainer root>/rejects.jsonl``, and
            raise when a split's skipped fraction exceeds ``max_skip_fraction``).
        image_cache_mb: per-process cache of processed images (workers persist between epochs).
        global_batch_size: the batch summed over devices and accumulation steps (the papers'
            figure); None keeps ``batch_size`` per device with no accumulation. Only checked
            here (a positive int); the CLI derives gradient accumulation from it, the world
            size and ``batch_size``.
        val_fraction: with no ``val_file``, the fraction (0 < f < 1) of ``train_file``'s
            records held out for validation, chosen by a hash of each record's id, so the
            split is identical across runs, ranks, resumes and file orderings (see
            ``attanchor.data.split``; ``attanchor data split`` writes the same split to files).
        max_image_pixels: images with more pixels (width x height) are bad records (a
            decompression bomb cannot exhaust memory); every image is fully decoded when the
            records are checked, so a truncated or corrupt one is caught before training.
        group_by_length: batches of similar length (``attanchor.data.grouping``): the epoch
            order comes from ``length_grouped_indices`` (still a function of seed and epoch,
            still resumable) instead of a uniform shuffle.
        packing: training batches of ``batch_size`` samples packed end to end into rows of
            ``max_length`` tokens (``attanchor.data.packing``; padding-free; the model side
            confines attention and anchoring to each sample). Evaluation stays padded.
    """

    def __init__(self, model_path: str, train_file: str | None = None,
                 val_file: str | None = None, test_file: str | None = None,
                 predict_file: str | None = None, image_root: str | None = None,
                 format: str = "llava", template: str | None = None, max_length: int = 2048,
                 batch_size: int = 8, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0, on_bad_record: str = "error", max_skip_fraction: float = 0.01,
                 scope: str = "image_turn", rejects_file: str | None = None,
                 image_cache_mb: float = 256.0, drop_last: bool = False,
                 pin_memory: bool = False, global_batch_size: int | None = None,
                 val_fraction: float | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 group_by_length: bool = False, packing: bool = False) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format={format!r}: allowed are {FORMATS}")
        if template is not None and template not in NAMED_TEMPLATES:
            raise ValueError(f"template={template!r}: allowed are None or "
                             f"{sorted(NAMED_TEMPLATES)}")
        if on_bad_record not in POLICIES:
            raise ValueError(f"on_bad_record={on_bad_record!r}: allowed are {POLICIES}")
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r}: allowed are {SCOPES}")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction={max_skip_fraction}: must lie in [0, 1]")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if global_batch_size is not None and (isinstance(global_batch_size, bool) or
                                              not isinstance(global_batch_size, int) or
                                              global_batch_size < 1):
            raise ValueError(f"global_batch_size={global_batch_size!r}: must be a positive "
                             "int (the batch over all devices and accumulation steps) or None")
        if val_fraction is not None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r}: must lie strictly between 0 and "
                             "1 (the fraction of train_file held out for validation) or be None")
        if val_fraction is not None and val_file is not None:
            raise ValueError(f"val_file={val_file!r} and val_fraction={val_fraction} are both "
                             "given: use the validation file or carve a split from train_file, "
                             "not both")
        self.save_hyperparameters()
        self.model_path, self.format, self.template = model_path, format, template
        self.files = {"train": train_file, "val": val_file, "test": test_file,
                      "predict": predict_file or test_file}
        self.image_root, self.max_length, self.scope = image_root, max_length, scope
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.drop_last = num_workers, seed, drop_last
        self.on_bad_record, self.max_skip_fraction = on_bad_record, max_skip_fraction
        self.rejects_file, self.image_cache_mb, self.pin_memory = \
            rejects_file, image_cache_mb, pin_memory
        self.global_batch_size, self.val_fraction = global_batch_size, val_fraction
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or \
                max_image_pixels < 1:
            raise ValueError(f"max_image_pixels={max_image_pixels!r}: must be a positive int "
                             "(width x height; images above it are bad records)")
        self.max_image_pixels = max_image_pixels
        self.group_by_length = group_by_length
        self.packing = packing
        self._train_sampler: ResumableSampler | None = None
        self._sampler_state: dict[str, Any] | None = None  # from a checkpoint, until applied
        self._processor: Any = None
        self.datasets: dict[str, RenderedDataset] = {}
        self.rejects: dict[str, list[dict[str, str]]] = {}

    @property
    def processor(self) -> Any:
        if self._processor is None:
            from attanchor.data.images import load_processor  # Qwen without torchvision too

            self._processor = load_processor(self.model_path, trust_remote_code=False)
        return self._processor

    @property
    def pad_token_id(self) -> int:
        pad = self.processor.tokenizer.pad_token_id
        if pad is None:
            raise ValueError(f"the tokenizer of {self.model_path} has no pad token; set one "
                             "(e.g. tokenizer.pad_token = tokenizer.unk_token) and save it")
        return pad

    def _root(self, split: str) -> str:
        # A val_fraction split takes its validation records, and their images, from train_file.
        return self.image_root or str(Path(self.files[split] or self.files["train"]).parent)

    def _has(self, split: str) -> bool:
        """Whether ``split`` has data: its own file, or for val a val_fraction of train_file."""
        return self.files[split] is not None or (
            split == "val" and self.val_fraction is not None and self.files["train"] is not None)

    def _index(self, split: str) -> None:
        if split in self.datasets:
            return
        if self.val_fraction is not None and split in ("train", "val"):
            self._index_split()
        elif self.files[split] is not None:
            self.datasets[split] = self._dataset(split, self._checked(split))

    def _index_split(self) -> None:
        """train_file -> train and val datasets by record-id hash (``attanchor.data.split``)."""
        path = self.files["train"]
        if path is None:
            raise ValueError(f"val_fraction={self.val_fraction} carves validation out of "
                             "train_file, but no train_file is given")
        index = self._checked("train")
        is_val = split_mask(((c.id, c.id_given) for c in (index[i] for i in range(len(index)))),
                            self.val_fraction, source=str(path))
        for split, side in (("train", False), ("val", True)):
            keep = [i for i, v in enumerate(is_val) if v == side]
            self.datasets[split] = self._dataset(split, index.subset(keep))

    def _checked(self, split: str) -> RecordIndex:
        """Read and check ``split``'s file (cached), applying the bad-record policy."""
        path = self.files[split]
        gen = split == "predict"
        root = self._root(split)
        checker = Renderer(self.processor, template=self.template, scope=self.scope,
                           max_length=self.max_length, image_root=root)
        stop = self.on_bad_record == "error"
        stat = os.stat(path)
        # Arms of one comparison run in one process over the same files: check them once.
        key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, self.format,
               str(Path(root).resolve()), self.template, self.scope, self.max_length,
               str(self.model_path), len(self.processor.tokenizer),
               hash(self.processor.tokenizer.chat_template), gen, stop, self.max_image_pixels)
        # Every image is decoded under this limit when checked (formats.check_image), and
        # again, under the same limit, in the loader's workers (RenderedDataset).
        set_max_image_pixels(self.max_image_pixels)
        try:
            if key not in _INDEX_CACHE:
                _INDEX_CACHE[key] = index_records(
                    path, format=self.format, image_root=root, renderer=checker,
                    for_generation=gen, stop_at_first=stop)
                while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
                    _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
            index, bad, total = _INDEX_CACHE[key]
        except BadRecordError as e:
            raise BadRecordError(e.record_id, f"{e.reason} [{split} file {path}; run `attanchor "
                                 f"data validate --data {path}` to list every bad record, or "
                                 "set on_bad_record=skip]") from None
        if self.on_bad_record == "skip":
            self.rejects[split] = [{"split": split, "file": str(path), "id": e.record_id,
                                    "reason": e.reason} for e in bad]
            self._write_rejects()
            if bad:
                log.warning("%s: skipped %d of %d records of %s (reasons in %s)", split,
                            len(bad), total, path, self._rejects_path())
            if total and len(bad) / total > self.max_skip_fraction:
                raise ValueError(
                    f"{split}: {len(bad)} of {total} records of {path} are bad "
                    f"({len(bad) / total:.1%} > max_skip_fraction={self.max_skip_fraction}); "
                    f"reasons in {self._rejects_path()}; first: {bad[0]}")
        if len(index) == 0:
            raise ValueError(f"{split}: {path} holds no usable record")
        return index

    def _dataset(self, split: str, index: RecordIndex) -> RenderedDataset:
        root = self._root(split)
        renderer = Renderer(self.processor, template=self.template, scope=self.scope,
                            max_length=self.max_length, image_root=root,
                            verify_template=False,  # every record was verified just above
                            image_cache_mb=self.image_cache_mb)
        return RenderedDataset(index, renderer, for_generation=split == "predict")

    def _rejects_path(self) -> Path:
        if self.rejects_file:
            return Path(self.rejects_file)
        root = getattr(self.trainer, "default_root_dir", None) if self.trainer else None
        return Path(root or os.getcwd()) / "rejects.jsonl"

    def _write_rejects(self) -> None:
        if self.trainer is not None and self.trainer.global_rank != 0:
            return
        path = self._rejects_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for rows in self.rejects.values():
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                  "predict": ("predict",), None: ("train", "val", "test", "predict")}[stage]
        if stage == "fit" and self.files["train"] is None:
            raise ValueError("fit needs train_file")
        for split in splits:
            self._index(split)

    def _loader(self, split: str, *, batch_size: int, padding_side: str,
                sampler: Any = None) -> DataLoader:
        if split not in self.datasets:
            if not self._has(split):
                raise ValueError(f"no {split} file given ({split}_file)")
            self._index(split)
        batcher = partial(collate, pad_token_id=self.pad_token_id, padding_side=padding_side)
        if self.packing and split == "train":
            batcher = partial(packed_collate, pad_token_id=self.pad_token_id,
                              max_length=self.max_length)
        return DataLoader(
            self.datasets[split], batch_size=batch_size, sampler=sampler, shuffle=False,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            collate_fn=batcher,
            pin_memory=self.pin_memory, drop_last=self.drop_last and split == "train")

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            self._index("train")
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        # Order = f(seed, epoch): Lightning calls set_epoch; a checkpoint's position is applied.
        sampler = ResumableSampler(len(self.datasets["train"]), num_replicas=world, rank=rank,
                                   seed=self.seed, drop_last=self.drop_last,
                                   order_fn=self._grouped_order(world))
        if self._sampler_state is not None:
            sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        self._train_sampler = sampler
        return self._loader("train", batch_size=self.batch_size, padding_side="right",
                            sampler=sampler)

    def _grouped_order(self, world: int) -> Any:
        """``epoch -> order`` with ``group_by_length`` (None: the sampler's shuffle)."""
        if not self.group_by_length:
            return None
        return grouped_order_fn(self.datasets["train"], self.batch_size * world, self.seed)

    def val_dataloader(self) -> DataLoader | list:
        if not self._has("val"):
            return []  # Lightning runs no validation loop for an empty list
        return self._loader("val", batch_size=self.eval_batch_size, padding_side="right")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", batch_size=self.eval_batch_size, padding_side="right")

    def predict_dataloader(self) -> DataLoader:
        """Prompts only (no answer, generation prompt appended), left-padded for generate."""
        return self._loader("predict", batch_size=self.eval_batch_size, padding_side="left")

    # -- render settings in the checkpoint (Lightning stores state_dict() under the class name)
    def _render_state(self) -> dict[str, Any]:
        return {"template": self.template, "scope": self.scope, "format": self.format}

    def state_dict(self) -> dict[str, Any]:
        """How prompts were rendered, ``{"template", "scope", "format"}``, and during fit
        where the training order stands, ``"sampler"`` (``ResumableSampler.state_dict``).
        Lightning writes it into every checkpoint, so evaluation renders prompts as training
        did (``attanchor.train.checkpoint.load_anchored``) and a resume continues the epoch
        where it stopped."""
        state = self._render_state()
        sampler = self._train_sampler
        if sampler is not None and self.trainer is not None and self.trainer.state.fn == "fit":
            sampler.consumed = consumed_in_epoch(self.trainer, sampler, self.batch_size)
            state["sampler"] = sampler.state_dict()
        elif self._sampler_state is not None:  # restored but not yet applied: keep it
            state["sampler"] = dict(self._sampler_state)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: the stored render settings must be this run's (a run trained half with
        one template and half with another has no meaning). Raises during fit on a mismatch;
        validate/test/predict with other settings only warn (evaluating another rendering on
        purpose is legitimate). A stored ``"sampler"`` position is applied to the next training
        loader (Lightning restores the data module before it asks for the loaders)."""
        if "sampler" in state_dict and (self.trainer is None or self.trainer.state.fn == "fit"):
            # Kept for the loader Lightning asks for next, and applied to one it already has
            # (a second fit on the same trainer reuses its loader).
            self._sampler_state = dict(state_dict["sampler"])
            if self._train_sampler is not None:
                self._train_sampler.load_state_dict(self._sampler_state)
        current = self._render_state()
        changed = {k: (state_dict[k], current[k]) for k in current
                   if k in state_dict and state_dict[k] != current[k]}
        if not changed:
            return
        what = ", ".join(f"data.{k}: checkpoint {old!r}, now {new!r}"
                         for k, (old, new) in changed.items())
        if self.trainer is not None and self.trainer.state.fn == "fit":
            raise ValueError(f"resuming with other render settings than the checkpoint's ({what}): "
                             "pass the checkpoint's values (e.g. --data.template) or start a "
                             "new run")
        log.warning("render settings differ from the checkpoint's: %s", what)
