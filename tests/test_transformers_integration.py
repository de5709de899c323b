"""MultiTeacherDistillationTrainer on tiny random Llama models built from configs (no download)."""

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the optional extra `llm` (transformers) is not installed"
)

import mtbkd  # noqa: E402
from mtbkd.integrations.transformers import (  # noqa: E402
    MultiTeacherDistillationTrainer,
    hidden_and_head,
)

V = 64


def _llama(hidden, vocab=V, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).float()


def _data(n=16, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, V, (t,), generator=g)
        labels = ids.clone()
        labels[-3:] = -100  # padding-like positions
        rows.append({"input_ids": ids, "attention_mask": torch.ones(t, dtype=torch.long),
                     "labels": labels})  # fmt: skip
    return rows


def _trainer(tmp_path, student, loss, steps, bs=4, ga=1, lr=3e-2, optim="adamw_torch"):
    # Two teachers: different hidden sizes, one with a vocabulary padded beyond the student's.
    teachers = [_llama(48, seed=1), _llama(40, vocab=V + 8, seed=2)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga, learning_rate=lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=True, dataloader_num_workers=0, seed=0, optim=optim, disable_tqdm=True,
    )  # fmt: skip
    return MultiTeacherDistillationTrainer(
        model=student, teachers=teachers, loss=loss, args=args, train_dataset=_data(),
        chunk_size=16,
    )  # fmt: skip


def _batch():
    rows = _data()[:8]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


LOSSES = [mtbkd.MTBKDLoss(), mtbkd.MultiTeacherKDLoss(hard_label_weight=0.5)]


@pytest.mark.parametrize("loss", LOSSES)
def test_trainer_runs_and_loss_decreases(tmp_path, loss):
    student = _llama(32, seed=3)
    trainer = _trainer(tmp_path, student, loss, steps=12)
    batch = _batch()
    with torch.no_grad():
        before = trainer.compute_loss(student, batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(student, batch).item()
    assert after < before - 0.05 * abs(before), (before, after)


def test_loss_matches_unfused_logits(tmp_path):
    student = _llama(32, seed=3)
    trainer = _trainer(tmp_path, student, mtbkd.MTBKDLoss(), steps=1)
    batch = _batch()
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        t_logits = [t(input_ids=batch["input_ids"]).logits[..., :V] for t in trainer.teachers]
    logits = student(input_ids=batch["input_ids"]).logits
    shifted = torch.cat([batch["labels"][:, 1:], torch.full((8, 1), -100)], 1)
    ref = mtbkd.mtbkd_loss(logits, t_logits, shifted)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    # num_items_in_batch replaces the mean's denominator.
    n = int((shifted != -100).sum())
    torch.testing.assert_close(trainer.compute_loss(student, batch, num_items_in_batch=2 * n),
                               ref / 2, rtol=1e-4, atol=1e-5)  # fmt: skip
    h, w, b = hidden_and_head(student, batch)
    assert h.shape == (8, 12, 32) and w.shape == (V, 32) and b is None


def test_gradient_accumulation_is_exact(tmp_path):
    """One SGD step with batch 4 equals one with 2 x 2 accumulated micro-batches."""
    params = []
    for bs, ga in ((4, 1), (2, 2)):
        student = _llama(32, seed=3)
        trainer = _trainer(tmp_path / f"{bs}", student, mtbkd.MTBKDLoss(), steps=1, bs=bs, ga=ga,
                           lr=1.0, optim="sgd")  # fmt: skip
        trainer.args.max_grad_norm = 0.0  # no clipping: compare the raw gradient step
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-5)


def test_needs_teachers(tmp_path):
    with pytest.raises(ValueError, match="teachers"):
        MultiTeacherDistillationTrainer(model=_llama(32), teachers=[], loss=mtbkd.MTBKDLoss())
