"""Launched by test_trainer.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo)."""

import hashlib
import json
import os
import sys

import torch

from test_trainer import geta_args, qa_rows, tiny_bert_qa

from geta_hf import GETATrainer


def main(out: str) -> None:
    torch.set_num_threads(1)
    model = tiny_bert_qa(dropout=0.0)
    args = geta_args(out, per_device_train_batch_size=4, num_train_epochs=5)
    trainer = GETATrainer(model=model, args=args, train_dataset=qa_rows(64))
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    h = hashlib.sha256()
    for _, p in sorted(trainer.model.named_parameters()):
        h.update(p.detach().numpy().tobytes())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.args.world_size,
                   "pruned": sorted(trainer.geta_optimizer.pruned_units),
                   "params_hash": h.hexdigest()}, f)
    trainer.save_compressed(os.path.join(out, "compressed"))


if __name__ == "__main__":
    main(sys.argv[1])
