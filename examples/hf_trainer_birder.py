"""Birder in the Hugging Face ``Trainer``: two changed lines, a tiny GPT-2 trained from scratch on text.

The recipe (``dist_supernet.integrations.transformers`` says where each piece plugs in and why)::

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      optimizer_cls_and_kwargs=(Birder, {"lr": 3e-3}))   # new: Birder instead of AdamW
    trainer.add_callback(BirderCallback(trainer))                        # new: the 1-bit exchange

The Trainer's own habits keep working: ``max_grad_norm`` (on by default) clips this rank's own
gradient, ``gradient_accumulation_steps`` uses ``no_sync()`` (one 1-bit exchange per optimizer
step), the LR schedule scales Birder's lr, and ``resume_from_checkpoint`` continues bit-identically
(every rank's m, b are in ``optimizer.pt``).

The model is a 2-layer GPT-2 built from a config (random init, nothing downloaded); the text is the
project's own corpus (``data=text``: Python's documentation, built from the local Python install and
cached; one character per token).

Example::
    torchrun --standalone --nproc_per_node=2 examples/hf_trainer_birder.py --max-steps 100
    torchrun --standalone --nproc_per_node=2 examples/hf_trainer_birder.py --max-steps 200 --resume
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from dist_supernet import Birder
from dist_supernet.data import load_text
from dist_supernet.integrations.transformers import BirderCallback


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive ``block_size``-token windows of a text, as the Trainer's ``input_ids`` / ``labels``."""

    def __init__(self, data_T: torch.Tensor, block_size: int):
        self.blocks_NB = data_T[: len(data_T) // block_size * block_size].view(-1, block_size)

    def __len__(self):
        return len(self.blocks_NB)

    def __getitem__(self, i):
        block = self.blocks_NB[i]
        return {"input_ids": block, "labels": block}  # the model shifts the labels itself


def text_blocks(block_size=64):
    """(vocab size, train, val :class:`TokenBlocks`) of the project's text corpus (``load_text``, ~2 MB)."""
    text = load_text()  # the first call on a machine builds the corpus (seconds), later ones read its cache
    return (text.vocab_size, TokenBlocks(text.train.long(), block_size),
            TokenBlocks(text.val.long(), block_size))


def tiny_gpt2(vocab_size, block_size=64, seed=0):
    torch.manual_seed(seed)  # the same init everywhere (DDP broadcasts rank 0's anyway)
    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def make_trainer(output_dir, *, max_steps=100, lr=3e-3, batch_size=8, save_steps=50, max_grad_norm=1.0,
                 accumulate=1, seed=0, callbacks=()):
    """The Trainer with Birder attached; ``trainer.train()`` runs it."""
    vocab_size, train, val = text_blocks()
    args = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulate, max_grad_norm=max_grad_norm, lr_scheduler_type="cosine",
        logging_steps=1, save_steps=save_steps, seed=seed, use_cpu=not torch.cuda.is_available(),
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=tiny_gpt2(vocab_size, seed=seed), args=args, train_dataset=train, eval_dataset=val,
                      optimizer_cls_and_kwargs=(Birder, {"lr": lr}),  # new: Birder instead of AdamW
                      callbacks=list(callbacks))
    trainer.add_callback(BirderCallback(trainer))  # new: attach after the Trainer's DDP wrap
    return trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output-dir", default="outputs/hf_trainer_birder")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-N in --output-dir")
    args = parser.parse_args()
    trainer = make_trainer(args.output_dir, max_steps=args.max_steps, lr=args.lr)
    trainer.train(resume_from_checkpoint=args.resume or None)
    metrics = trainer.evaluate()
    birder = trainer.optimizer.optimizer  # inside Accelerate's AcceleratedOptimizer
    stats = birder.comm_stats.snapshot()
    if trainer.is_world_process_zero():
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}, val loss {metrics['eval_loss']:.3f}, "
              f"hooked {birder.hooked}, steps {birder.num_steps}, rank 0 sent {stats['bytes_total']} bytes")


if __name__ == "__main__":
    main()
