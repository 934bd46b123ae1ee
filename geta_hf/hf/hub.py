"""Pushing compressed models to the Hugging Face Hub: the compressed files, tokenizer and card."""

from __future__ import annotations

import os
import tempfile
import types
from typing import Any, Mapping, Optional

from torch import nn

__all__ = ["push_compressed_to_hub", "upload_compressed_folder", "bind_push_to_hub"]


def _api(token):
    import huggingface_hub

    return huggingface_hub.HfApi(token=token)


def push_compressed_to_hub(model: nn.Module, repo_id: str, *, commit_message: str = "Upload "
                           "GETA-compressed model", private: Optional[bool] = None,
                           token: Optional[str] = None, revision: Optional[str] = None,
                           create_pr: bool = False, processing_class=None,
                           eval_results: Optional[Mapping[str, float]] = None,
                           dataset: Optional[str] = None, license: Optional[str] = None,
                           base_model: Optional[str] = None,
                           geta_config: Optional[Mapping[str, Any]] = None,
                           blocking: bool = True):
    """Upload a compressed model to ``repo_id`` exactly as :func:`geta_hf.save_compressed`
    writes it (packed weights, ``geta`` quantization config, the tokenizer when given, the GETA
    model card); returns ``HfApi.upload_folder``'s result. The upload always completes before
    this returns (``blocking`` is accepted for ``Trainer.push_to_hub`` compatibility). Any other
    keyword (e.g. ``PreTrainedModel.push_to_hub``'s ``max_shard_size``) is a ``TypeError``."""
    from .serialization import save_compressed

    api = _api(token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        save_compressed(model, folder, processing_class=processing_class,
                        eval_results=eval_results, dataset=dataset, license=license,
                        base_model=base_model, geta_config=geta_config)
        # the temporary folder must outlive the upload, so it is always blocking here
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message, create_pr=create_pr)


def upload_compressed_folder(folder: str, repo_id: str, *, commit_message: str,
                             private: Optional[bool] = None, token: Optional[str] = None,
                             revision: Optional[str] = None, create_pr: bool = False):
    """Upload a folder written by :func:`geta_hf.save_compressed` as it is (creating the repo
    if needed); returns ``HfApi.upload_folder``'s result."""
    api = _api(token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                             commit_message=commit_message, create_pr=create_pr)


def bind_push_to_hub(model: nn.Module) -> None:
    """Make ``model.push_to_hub(repo_id, ...)`` push the compressed checkpoint with its card
    (transformers' own would upload a blank card)."""

    def push_to_hub(self, repo_id: str, **kwargs):
        return push_compressed_to_hub(self, repo_id, **kwargs)

    push_to_hub.__doc__ = push_compressed_to_hub.__doc__
    model.push_to_hub = types.MethodType(push_to_hub, model)
