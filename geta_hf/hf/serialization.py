"""Saving compressed models: `save_compressed`, the model card, and `compress_model` for HF models."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional

from torch import nn

from ..surgery import CompressedArch
from ..compress.subnet import compress_model as _core_compress
from .card import model_card
from .hub import bind_push_to_hub
from .quantizer import GETAHfQuantizer, quantization_config_from_model

__all__ = ["save_compressed", "attach_quantization_config", "compress_model", "model_card",
           "MANIFEST", "SaveRollbackError"]

logger = logging.getLogger(__name__)

#: the list of files one ``save_compressed`` wrote, kept in the folder it wrote them to
MANIFEST = "geta_save.json"


class SaveRollbackError(OSError):
    """A failed save could not put every earlier file back; the message names the folder that
    still holds them (nothing is deleted in that case)."""


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
    * any other non-empty folder, a file or a link to one, is refused with
      :class:`FileExistsError`, and so is a new file name that already exists in that folder.

    An interrupted save therefore leaves the previous checkpoint intact. Should even putting the
    earlier files back fail, they are kept in a ``<dir>.old-*`` folder beside the target that
    :class:`SaveRollbackError` names. A failure to remove a temporary folder after the save is
    logged as a warning naming it. With ``example_inputs`` the card includes MACs and BOPs.
    """
    if CompressedArch.of(model) is None:
        raise ValueError("save_compressed: the model is not compressed; call "
                         "geta_hf.compress_model(model, qadg) (or trainer.save_compressed) first")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_compressed: {type(model).__name__} is not a transformers PreTrainedModel")
    target = os.path.abspath(save_directory)
    previous = _check_target(target)  # refuse a foreign target before any work
    gcfg = dict(geta_config) if geta_config is not None else None
    attach_quantization_config(model, geta_config=gcfg, base_model=base_model)
    stats = None
    if example_inputs is not None:
        from ..compress.metrics import model_stats

        stats = model_stats(model, example_inputs)
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
        _remove_tree(tmp)
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
    if not os.path.lexists(target):
        return None
    if not os.path.isdir(target):  # a file, or a link to one or to nothing
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


def _remove_tree(path: str) -> None:
    """Remove a temporary folder this module created; a failure is logged, never raised (it must
    not hide the save's own outcome or error)."""
    if not os.path.lexists(path):
        return
    try:
        shutil.rmtree(path)
    except OSError as e:
        logger.warning("save_compressed: could not remove the temporary folder %r (%s); it holds "
                       "only files save_compressed wrote and can be deleted", path, e)


def _swap_files(new_dir: str, target: str, previous: list) -> None:
    """Replace the earlier save's ``previous`` files in ``target`` by ``new_dir``'s files; on
    failure put every earlier file back where it was (see :class:`SaveRollbackError`)."""
    names = sorted(os.listdir(new_dir), key=lambda n: (n == MANIFEST, n))  # manifest last
    for name in names:  # refuse before anything is moved
        if name not in previous and os.path.lexists(os.path.join(target, name)):
            raise FileExistsError(f"save_compressed: {os.path.join(target, name)!r} was not "
                                  "written by an earlier save_compressed; nothing was changed")
    backup = tempfile.mkdtemp(prefix=os.path.basename(target) + ".old-", dir=os.path.dirname(target))
    moved_out, moved_in = [], []
    try:
        for name in previous:
            os.replace(os.path.join(target, name), os.path.join(backup, name))
            moved_out.append(name)
        for name in names:
            os.replace(os.path.join(new_dir, name), os.path.join(target, name))
            moved_in.append(name)
    except BaseException as err:
        failed = _roll_back(new_dir, target, backup, moved_in, moved_out)
        if not failed:
            _remove_tree(backup)
            raise
        msg = (f"save_compressed into {target!r} failed ({type(err).__name__}: {err}) and "
               f"{len(failed)} earlier file(s) (e.g. {failed[0]!r}) could not be put back; they "
               f"are kept in {backup!r}")
        if not isinstance(err, Exception):  # an interrupt stays an interrupt
            logger.error(msg)
            raise
        raise SaveRollbackError(msg) from err
    _remove_tree(backup)


def _roll_back(new_dir: str, target: str, backup: str, moved_in: list, moved_out: list) -> list:
    """Undo a partial swap; returns the earlier files that are not back in ``target``."""
    for name in moved_in:  # the new files: back to the temporary folder (removed with it)
        try:
            os.replace(os.path.join(target, name), os.path.join(new_dir, name))
        except OSError:
            if name not in moved_out:  # a new name: it must not stay in the target
                try:
                    os.remove(os.path.join(target, name))
                except OSError:
                    pass
    failed = []
    for name in moved_out:
        try:
            os.replace(os.path.join(backup, name), os.path.join(target, name))
        except OSError:
            failed.append(name)
    return failed
