"""Saves that never destroy (issue 19): a failure injected at every step of `save_compressed`
leaves the previous checkpoint byte-identical and nothing behind; user files, ``"."``, files,
links and a user's ``<dir>.old`` are preserved or refused by name.
"""

import builtins
import errno
import logging
import os
import shutil
import tempfile

import pytest
import torch
from safetensors import safe_open

import geta_hf
import geta_hf.hf.serialization as ser
import transformers.modeling_utils as tf_modeling
from geta_hf.hf.serialization import SaveRollbackError

from test_strict_load import _compress
from tiny_models import build


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two different compressed tiny BERTs and a reference save of each."""
    root = tmp_path_factory.mktemp("faults")
    out = {}
    for key, seed in (("old", 0), ("new", 1)):
        model, make = build("bert", seed=seed)
        _compress(model, make, seed=seed)
        geta_hf.save_compressed(model, str(root / key))
        out[key] = model
        out[key + "_ref"] = root / key
    return out


def _snapshot(root):
    """Every file under ``root`` (relative path -> bytes) and every folder."""
    files, dirs = {}, set()
    for base, ds, fs in os.walk(root):
        rel = os.path.relpath(base, root)
        dirs.update(os.path.normpath(os.path.join(rel, d)) for d in ds)
        for f in fs:
            with open(os.path.join(base, f), "rb") as h:
                files[os.path.normpath(os.path.join(rel, f))] = h.read()
    return files, dirs


def _tensors_and_meta(path):
    with safe_open(str(path), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}, h.metadata()


def _assert_is_save_of(target, ref):
    """``target`` holds the files of the reference save ``ref`` (model.safetensors compared by
    tensors and metadata: safetensors writes metadata keys in no fixed order)."""
    for name in os.listdir(ref):
        assert (target / name).exists(), name
        if name == "model.safetensors":
            (a, ma), (b, mb) = _tensors_and_meta(target / name), _tensors_and_meta(ref / name)
            assert ma == mb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert (target / name).read_bytes() == (ref / name).read_bytes(), name


def _setup(root, scenario, models):
    """A folder with user files beside the target (including the user's own ``ck.old``) and the
    target in the given state; returns the target path."""
    root.mkdir()
    (root / "notes.txt").write_text("user data beside")
    (root / "ck.old").mkdir()
    (root / "ck.old" / "mine.txt").write_text("the user's own .old folder")
    target = root / "ck"
    if scenario == "resave":
        shutil.copytree(models["old_ref"], target)
        (target / "notes.txt").write_text("user data inside")
    elif scenario == "empty":
        target.mkdir()
    return target


class _Faults:
    """Wraps the file-system steps of a save; the ``k``-th call of step ``op`` (inside ``root``)
    raises ``exc``. File writes fail after writing part of the file."""

    def __init__(self, root, op, k, exc):
        self.root, self.op, self.k, self.exc = str(root), op, k, exc
        self.calls, self.fired, self.leftover = 0, None, None

    def _hit(self, op, path):
        if op != self.op or not str(path).startswith(self.root):
            return False
        self.calls += 1
        if self.calls == self.k:
            self.fired = f"{op} #{self.k} ({os.path.basename(str(path))})"
            return True
        return False

    def install(self, mp):
        real_open, real_save = builtins.open, tf_modeling.safe_save_file
        real = {"replace": os.replace, "rename": os.rename, "rmtree": shutil.rmtree,
                "mkdtemp": tempfile.mkdtemp}

        def moving(op):
            def move(src, dst, *a, **kw):
                if self._hit(op, src):
                    raise self.exc
                return real[op](src, dst, *a, **kw)
            return move

        def rmtree(path, *a, **kw):
            if self._hit("rmtree", path):
                self.leftover = str(path)
                raise self.exc
            return real["rmtree"](path, *a, **kw)

        def mkdtemp(*a, **kw):
            if self._hit("mkdtemp", kw.get("dir", "")):
                raise self.exc
            return real["mkdtemp"](*a, **kw)

        def opener(file, mode="r", *a, **kw):
            if any(c in mode for c in "wax") and self._hit("write", file):
                with real_open(file, mode, *a, **kw) as f:
                    f.write(b"{\"part" if "b" in mode else "{\"part")  # a partial file
                raise self.exc
            return real_open(file, mode, *a, **kw)

        def save_file(tensors, filename, metadata=None):
            if self._hit("write", filename):
                from safetensors.torch import save

                data = save(tensors, metadata=metadata)
                with real_open(filename, "wb") as f:
                    f.write(data[: len(data) // 2])
                raise self.exc
            return real_save(tensors, filename, metadata=metadata)

        mp.setattr(os, "replace", moving("replace"))
        mp.setattr(os, "rename", moving("rename"))
        mp.setattr(shutil, "rmtree", rmtree)
        mp.setattr(tempfile, "mkdtemp", mkdtemp)
        mp.setattr(builtins, "open", opener)
        mp.setattr(tf_modeling, "safe_save_file", save_file)


STEPS = [("new", "mkdtemp"), ("new", "write"), ("new", "rename"),
         ("resave", "mkdtemp"), ("resave", "write"), ("resave", "replace"), ("resave", "rmtree"),
         ("empty", "mkdtemp"), ("empty", "write"), ("empty", "replace"), ("empty", "rmtree")]


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 KeyboardInterrupt("killed")], ids=["disk-full", "interrupt"])
@pytest.mark.parametrize("scenario,op", STEPS, ids=[f"{s}-{o}" for s, o in STEPS])
def test_a_failure_at_every_step_keeps_the_previous_state(models, tmp_path, monkeypatch, caplog,
                                                          scenario, op, exc):
    """For k = 1, 2, ...: the k-th call of one step fails. The target and everything beside it
    are byte-identical to before (no temporary folder, no partial file), except when only the
    clean-up after a completed save failed: then the new checkpoint is complete and the folder
    left over is named in a warning (or the interrupt propagates)."""
    fired = 0
    for k in range(1, 40):
        root = tmp_path / f"k{k}"
        target = _setup(root, scenario, models)
        before = _snapshot(root)
        faults = _Faults(root, op, k, exc)
        caplog.clear()
        with monkeypatch.context() as mp, caplog.at_level(logging.WARNING, logger=ser.__name__):
            faults.install(mp)
            try:
                geta_hf.save_compressed(models["new"], str(target))
                raised = None
            except BaseException as e:  # noqa: B036 -- KeyboardInterrupt is one injected fault
                raised = e
        if faults.fired is None:  # k is past the last call: a clean save
            assert raised is None and fired > 0, f"{op} never called in {scenario}"
            _assert_is_save_of(target, models["new_ref"])
            break
        fired += 1
        step = f"{scenario}: {faults.fired}"
        if op == "rmtree":  # only clean-up after the save completed can fail here
            assert raised is exc or (raised is None and faults.leftover in caplog.text), step
            assert os.path.basename(faults.leftover).startswith(("ck.old-", "ck.tmp-")), step
            shutil.rmtree(faults.leftover)
            _assert_is_save_of(target, models["new_ref"])
            if scenario == "resave":
                assert (target / "notes.txt").read_text() == "user data inside"
            files, _ = _snapshot(root)
            assert files["notes.txt"] == b"user data beside"
            assert files[os.path.join("ck.old", "mine.txt")] == b"the user's own .old folder"
            continue
        assert raised is exc, f"{step}: {raised!r}"
        assert _snapshot(root) == before, f"{step}: the folder changed"
    assert fired > 0


def test_a_rollback_that_cannot_complete_keeps_the_earlier_files(models, tmp_path, monkeypatch):
    """os.replace fails for good from its 3rd call on (the disk went away): the earlier files
    cannot all be put back, so none is deleted; the error names the folder that holds them."""
    target = _setup(tmp_path / "r", "resave", models)
    before, _ = _snapshot(target)
    real, calls = os.replace, []

    def broken(src, dst):
        calls.append(src)
        if len(calls) >= 3:
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(SaveRollbackError, match=r"could not be put back; they are kept in '.*ck\.old-") as e:
        geta_hf.save_compressed(models["new"], str(target))
    monkeypatch.undo()
    backup = str(e.value).rsplit("kept in ", 1)[1].strip("'")
    for name, data in before.items():  # every earlier file: in place or in the named folder
        here = target / name
        there = os.path.join(backup, name)
        kept = here.read_bytes() if here.exists() else open(there, "rb").read()
        assert kept == data, name
    assert (target / "notes.txt").read_text() == "user data inside"


def test_dot_target_is_refused_in_a_non_empty_working_folder(models, tmp_path, monkeypatch):
    """Before: save_compressed(model, ".") replaced the working directory."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text("print('mine')")
    monkeypatch.chdir(work)
    with pytest.raises(FileExistsError, match=r"'.*work' already holds 1 entry \(e\.g\. 'train\.py'\)"):
        geta_hf.save_compressed(models["new"], ".")
    assert os.listdir(work) == ["train.py"] and sorted(os.listdir(tmp_path)) == ["work"]


def test_dot_target_in_an_empty_working_folder_writes_into_it(models, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    inode = work.stat().st_ino
    monkeypatch.chdir(work)
    geta_hf.save_compressed(models["old"], ".")
    (work / "notes.txt").write_text("mine")
    geta_hf.save_compressed(models["new"], ".")  # an earlier save: updated file by file
    assert work.stat().st_ino == inode  # the working folder itself was never replaced
    _assert_is_save_of(work, models["new_ref"])
    assert (work / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["work"]


@pytest.mark.parametrize("kind", ["link-to-file", "dangling-link"])
def test_links_that_are_not_folders_are_refused(models, tmp_path, kind):
    data = tmp_path / "data.bin"
    if kind == "link-to-file":
        data.write_bytes(b"precious")
    link = tmp_path / "ck"
    link.symlink_to(data)
    with pytest.raises(FileExistsError, match=r"'.*ck' is a file"):
        geta_hf.save_compressed(models["new"], str(link))
    assert link.is_symlink() and os.readlink(link) == str(data)
    assert kind == "dangling-link" or data.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == (["ck"] if kind == "dangling-link" else ["ck", "data.bin"])


def test_a_users_old_folder_beside_the_target_is_never_touched(models, tmp_path):
    """Before: an existing ``<dir>.old`` of the user's was deleted by the next save."""
    target = _setup(tmp_path / "r", "resave", models)
    for name in ("ck.old", "ck.old-1", "ck.tmp-1"):  # even names like the temporary folders'
        (tmp_path / "r" / name).mkdir(exist_ok=True)
        (tmp_path / "r" / name / "keep.txt").write_text(name)
    geta_hf.save_compressed(models["new"], str(target))
    _assert_is_save_of(target, models["new_ref"])
    assert sorted(os.listdir(tmp_path / "r")) == ["ck", "ck.old", "ck.old-1", "ck.tmp-1", "notes.txt"]
    for name in ("ck.old", "ck.old-1", "ck.tmp-1"):
        assert (tmp_path / "r" / name / "keep.txt").read_text() == name


def test_a_new_file_name_taken_by_a_user_file_is_refused_before_anything_moves(models, tmp_path):
    """The earlier save wrote no tokenizer; the user put a ``tokenizer.json`` of their own in the
    folder; a save with a tokenizer refuses (naming the file) and changes nothing."""
    target = _setup(tmp_path / "r", "resave", models)
    (target / "tokenizer.json").write_text('{"mine": true}')
    before = _snapshot(tmp_path / "r")

    class Tokenizer:
        def save_pretrained(self, folder):
            with open(os.path.join(folder, "tokenizer.json"), "w") as f:
                f.write('{"new": true}')

    with pytest.raises(FileExistsError, match=r"'.*ck/tokenizer\.json' was not written by an earlier "
                       "save_compressed; nothing was changed"):
        geta_hf.save_compressed(models["new"], str(target), processing_class=Tokenizer())
    assert _snapshot(tmp_path / "r") == before
