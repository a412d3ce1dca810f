"""Offline end-to-end demo: ``python -m gsoft.demo``.

Builds a tiny RoBERTa classifier from a config (random weights, no download), adapts it with GSOFT, trains it on a
generated task, then merges, saves and reloads the adapter, checking at each step that the numbers agree.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch
from peft import PeftModel, get_peft_model
from transformers import RobertaConfig, RobertaForSequenceClassification

from . import GSOFTConfig


def make_task(n: int, vocab: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Label = whether token 5 appears more often than token 6: learnable, not linearly trivial from one position."""
    ids = torch.randint(7, vocab, (n, seq_len), generator=generator)
    for i in range(n):
        k5, k6 = torch.randint(0, 4, (2,), generator=generator).tolist()
        pos = torch.randperm(seq_len - 1, generator=generator)[: k5 + k6] + 1
        ids[i, pos[:k5]] = 5
        ids[i, pos[k5:]] = 6
    ids[:, 0] = 0  # <s>
    labels = ((ids == 5).sum(1) > (ids == 6).sum(1)).long()
    return ids, labels


def base_model(seed: int) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=40,
        num_labels=2,
    )
    return RobertaForSequenceClassification(config)


@torch.no_grad()
def accuracy(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--block_size", type=int, default=8)
    parser.add_argument("--double", action="store_true", help="Double GSOFT (rotate both sides)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # the model is tiny: one thread is as fast, and never stalls waiting for a busy core as an OpenMP team does
    torch.set_num_threads(1)

    gen = torch.Generator().manual_seed(args.seed)
    train_x, train_y = make_task(2048, 64, 32, gen)
    test_x, test_y = make_task(512, 64, 32, gen)

    # A "pretrained" base: briefly train the full tiny model on a related task (token 5 present at all), so there
    # are useful features to rotate.
    model = base_model(args.seed)
    pre_y = (train_x == 5).any(1).long()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(60):
        idx = torch.randint(0, len(train_x), (64,), generator=gen)
        loss = model(input_ids=train_x[idx], labels=pre_y[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    reference_state = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"base model: {sum(p.numel() for p in model.parameters()):,} parameters, test accuracy on the new task "
          f"{accuracy(model, test_x, test_y):.3f}")

    config = GSOFTConfig(block_size=args.block_size, double=args.double, task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    print(f"GSOFT{' (double)' if args.double else ''}: block_size={args.block_size}, target modules "
          f"{config.target_modules}; trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%, incl. the head)")
    with torch.no_grad():
        peft_model.eval()
        with peft_model.disable_adapter():
            before = peft_model(input_ids=test_x[:64]).logits
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        peft_model.train()
        idx = torch.randint(0, len(train_x), (64,), generator=gen)
        loss = peft_model(input_ids=train_x[idx], labels=train_y[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == args.steps:
            print(f"  step {step:4d}  loss {loss.item():.4f}  test accuracy {accuracy(peft_model, test_x, test_y):.3f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")

    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids=test_x).logits
        peft_model.merge_adapter()
        merged = peft_model(input_ids=test_x).logits
        peft_model.unmerge_adapter()
        with peft_model.disable_adapter():
            base_again = peft_model(input_ids=test_x[:64]).logits
    merge_err = (merged - unmerged).abs().max().item()
    print(f"merge: max |merged - unmerged| = {merge_err:.2e}; disabled adapter reproduces the base model: "
          f"{torch.allclose(base_again, before, atol=1e-5)}")

    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        fresh = base_model(args.seed)
        fresh.load_state_dict(reference_state)
        reloaded = PeftModel.from_pretrained(fresh, tmp).eval()
        with torch.no_grad():
            reload_err = (reloaded(input_ids=test_x).logits - unmerged).abs().max().item()
        merged_model = reloaded.merge_and_unload()
    print(f"save/reload: max |reloaded - trained| = {reload_err:.2e}; merge_and_unload gives a plain "
          f"{type(merged_model).__name__}")
    final = accuracy(merged_model, test_x, test_y)
    print(f"final test accuracy (merged model): {final:.3f}")
    return {"accuracy": final, "merge_err": merge_err, "reload_err": reload_err}


if __name__ == "__main__":
    main()
