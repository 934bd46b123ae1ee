"""Saving compressed models: `save_compressed`, the model card, and `compress_model` for HF models."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional

from torch import nn

from ..compress.subnet import ARCH_ATTR
from ..compress.subnet import compress_model as _core_compress
from .card import model_card
from .hub import bind_push_to_hub
from .quantizer import GETAHfQuantizer, quantization_config_from_model

__all__ = ["save_compressed", "attach_quantization_config", "compress_model", "model_card",
           "MANIFEST"]

#: the list of files one ``save_compressed`` wrote, kept in the folder it wrote them to
MANIFEST = "geta_save.json"


def attach_quantization_config(model: nn.Module, geta_config: Optional[dict] = None,
                               base_model: Optional[str] = None) -> None:
    """Give a compressed HF model the ``geta`` quantization config and quantizer, so that
    ``model.save_pretrained`` / ``push_to_hub`` write a checkpoint ``from_pretrained`` rebuilds."""
    if getattr(model, "config", None) is None:
        return
    qcfg = quantization_config_from_model(model, geta_config=geta_config, base_model=base_model)
    model.config.quantization_config = qcfg
    model.hf_quantizer = GETAHfQuantizer(qcfg, pre_quantized=True)
    bind_push_to_hub(model)


def compress_model(model: nn.Module, qadg, **kwargs) -> nn.Module:
    """:func:`geta_hf.compress.compress_model`, then (for HF models) attach the ``geta``
    quantization config so that ``model.save_pretrained`` writes a reloadable checkpoint."""
    _core_compress(model, qadg, **kwargs)
    if hasattr(model, "config") and hasattr(model, "save_pretrained"):
        attach_quantization_config(model)
    return model


def save_compressed(model: nn.Module, save_directory: str, *, processing_class=None,
                    eval_results: Optional[Mapping[str, float]] = None,
                    example_inputs: Optional[Mapping[str, Any]] = None,
                    geta_config: Optional[Mapping[str, Any]] = None,
                    base_model: Optional[str] = None, dataset: Optional[str] = None,
                    license: Optional[str] = None) -> str:
    """Write a compressed model as a standard HF folder: ``config.json`` (with the ``geta``
    ``quantization_config``), ``model.safetensors`` (bit-packed integer weights + float scales),
    the tokenizer/processor when given, and a ``README.md`` model card
    (:func:`geta_hf.hf.card.model_card`: ``base_model``, tags, ``model-index`` from
    ``eval_results`` on ``dataset``, ``license``).

    Nothing that ``save_compressed`` did not write is ever deleted, moved or overwritten:

    * a new (or empty) ``save_directory`` is written in a temporary folder beside it and renamed
      into place;
    * a folder of an earlier ``save_compressed`` (it holds the ``geta_save.json`` manifest of the
      files written then) is updated file by file: the earlier save's files are moved aside,
      the new ones moved in, and on any failure the earlier files are put back; files the user
      added to that folder stay untouched;
    * any other non-empty folder, or a file, is refused with :class:`FileExistsError`.

    An interrupted save therefore leaves the previous checkpoint intact. With ``example_inputs``
    the card includes MACs and BOPs.
    """
    arch = getattr(model, ARCH_ATTR, None)
    if not arch or not arch.get("compressed"):
        raise ValueError("save_compressed: the model is not compressed; call "
                         "geta_hf.compress_model(model, qadg) (or trainer.save_compressed) first")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_compressed: {type(model).__name__} is not a transformers PreTrainedModel")
    gcfg = dict(geta_config) if geta_config is not None else None
    attach_quantization_config(model, geta_config=gcfg, base_model=base_model)
    stats = None
    if example_inputs is not None:
        from ..compress.metrics import model_stats

        stats = model_stats(model, example_inputs)
    target = os.path.abspath(save_directory)
    previous = _check_target(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=parent)
    try:
        model.save_pretrained(tmp)
        if processing_class is not None:
            processing_class.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(model, stats=stats, eval_results=eval_results,
                               geta_config=gcfg, base_model=base_model, dataset=dataset,
                               license=license))
        _write_manifest(tmp)
        if previous is None:
            os.rename(tmp, target)  # a new folder: one atomic rename
        else:
            _swap_files(tmp, target, previous)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------- safe writing
def _read_manifest(folder: str) -> Optional[list]:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(files, list) and all(isinstance(n, str) and n and os.sep not in n
                                         and n not in (".", "..") for n in files)
    return files if ok else None


def _check_target(target: str) -> Optional[list]:
    """The files of an earlier save in ``target`` ([] for an empty folder), None if it does not
    exist; refuse a file or a non-empty folder that ``save_compressed`` did not write."""
    if not os.path.exists(target):
        return None
    if not os.path.isdir(target):
        raise FileExistsError(f"save_compressed: {target!r} is a file; give a folder path (new, "
                              "empty, or written by an earlier save_compressed)")
    entries = sorted(os.listdir(target))
    if not entries:
        return []
    files = _read_manifest(target)
    if files is None:
        raise FileExistsError(
            f"save_compressed: {target!r} already holds {len(entries)} entr"
            f"{'y' if len(entries) == 1 else 'ies'} (e.g. {entries[0]!r}) that save_compressed "
            "did not write; nothing was changed. Save into a new or empty folder (for "
            "GETATrainer: the default <output_dir>/compressed)")
    return [n for n in files if os.path.exists(os.path.join(target, n))]


def _write_manifest(folder: str) -> None:
    files = sorted(os.listdir(folder)) + [MANIFEST]
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"writer": "geta_hf.save_compressed", "files": files}, f, indent=1)


def _swap_files(new_dir: str, target: str, previous: list) -> None:
    """Replace the earlier save's ``previous`` files in ``target`` by ``new_dir``'s files; on
    failure put every earlier file back where it was."""
    backup = tempfile.mkdtemp(prefix=os.path.basename(target) + ".old-", dir=os.path.dirname(target))
    moved_out, moved_in = [], []
    drop_backup = False  # only once every earlier file is replaced or back in place
    try:
        for name in previous:
            os.replace(os.path.join(target, name), os.path.join(backup, name))
            moved_out.append(name)
        for name in sorted(os.listdir(new_dir), key=lambda n: n == MANIFEST):  # manifest last
            dst = os.path.join(target, name)
            if os.path.exists(dst):
                raise FileExistsError(f"save_compressed: {dst!r} was not written by an earlier "
                                      "save_compressed; nothing was changed")
            os.replace(os.path.join(new_dir, name), dst)
            moved_in.append(name)
        drop_backup = True
    except BaseException:
        for name in moved_in:
            os.replace(os.path.join(target, name), os.path.join(new_dir, name))
        for name in moved_out:
            os.replace(os.path.join(backup, name), os.path.join(target, name))
        drop_backup = True
        raise
    finally:
        if drop_backup:
            shutil.rmtree(backup, ignore_errors=True)
