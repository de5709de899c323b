"""MultiTeacherDistillationTrainer on tiny random Llama models built from configs (no download)."""

import gc
import os
import subprocess
import sys
import types
from pathlib import Path

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


def _llama(hidden, vocab=V, seed=0, cls=None):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    return (cls or transformers.LlamaForCausalLM)(cfg).float()


def _data(n=16, t=12, seed=0, ragged=False):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, V, (t,), generator=g)
        labels = ids.clone()
        labels[-(1 + i % 5 if ragged else 3) :] = -100  # padding-like positions
        rows.append({"input_ids": ids, "attention_mask": torch.ones(t, dtype=torch.long),
                     "labels": labels})  # fmt: skip
    return rows


def _stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _trainer(tmp_path, student, loss, steps, bs=4, ga=1, lr=3e-2, optim="adamw_torch",
             data=None, **kwargs):  # fmt: skip
    # Two teachers: different hidden sizes, one with a vocabulary padded beyond the student's.
    teachers = [_llama(48, seed=1), _llama(40, vocab=V + 8, seed=2)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga, learning_rate=lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=True, dataloader_num_workers=0, seed=0, optim=optim, disable_tqdm=True, **kwargs,
    )  # fmt: skip
    return MultiTeacherDistillationTrainer(
        model=student, teachers=teachers, loss=loss, args=args,
        train_dataset=_data() if data is None else data, chunk_size=16,
    )  # fmt: skip


def _batch():
    return _stack(_data()[:8])


def _shift(labels):
    return torch.cat([labels[:, 1:], torch.full((labels.shape[0], 1), -100)], 1)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


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
    shifted = _shift(batch["labels"])
    ref = mtbkd.mtbkd_loss(logits, t_logits, shifted)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    # num_items_in_batch replaces the mean's denominator.
    n = int((shifted != -100).sum())
    torch.testing.assert_close(trainer.compute_loss(student, batch, num_items_in_batch=2 * n),
                               ref / 2, rtol=1e-4, atol=1e-5)  # fmt: skip
    h, w, b = hidden_and_head(student, batch)
    assert h.shape == (8, 12, 32) and w.shape == (V, 32) and b is None
    # A loss with another ignore_index still masks the Trainer's -100 labels.
    trainer.distill_loss.ignore_index = -1
    torch.testing.assert_close(trainer.compute_loss(student, batch), ref, rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_is_exact(tmp_path):
    """One SGD step with batch 4 equals one with 2 x 2 accumulated micro-batches, and both equal
    the step on the gradient of the loss's mean over the 4 rows' shifted targets."""
    data = _data(4, ragged=True)  # 4 rows: every configuration's one step sees all of them
    params = []
    for bs, ga in ((4, 1), (2, 2)):
        student = _llama(32, seed=3)
        trainer = _trainer(tmp_path / f"{bs}", student, mtbkd.MTBKDLoss(), steps=1, bs=bs, ga=ga,
                           lr=1.0, optim="sgd", data=data)  # fmt: skip
        trainer.args.max_grad_norm = 0.0  # no clipping: compare the raw gradient step
        # transformers < 5.x counted num_items_in_batch over the unshifted labels.
        trainer._loss_shifts_labels = False
        trainer.train()
        params.append(_flat(student))
    student = _llama(32, seed=3)
    trainer.compute_loss(student, _stack(data)).backward()
    with torch.no_grad():
        for p in student.parameters():
            p -= p.grad
    torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(params[0], _flat(student), rtol=1e-4, atol=1e-5)


def test_num_items_counts_shifted_targets(tmp_path):
    """The Trainer's count of the rows the loss sums over, whatever its version."""
    trainer = _trainer(tmp_path, _llama(32, seed=3), mtbkd.MTBKDLoss(), steps=1)
    trainer._loss_shifts_labels = False  # as transformers < 5.x
    rows = _data(8, ragged=True)
    batches = [_stack(rows[:4]), _stack(rows[4:])]
    expected = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    got, n = trainer.get_batch_samples(iter(batches), 3, torch.device("cpu"))
    assert len(got) == 2 and int(n) == expected
    # Without labels: input_ids, masked where attention_mask == 0.
    masks = [b["attention_mask"].clone() for b in batches]
    masks[0][:, -4:] = 0
    plain = [{"input_ids": b["input_ids"], "attention_mask": m} for b, m in zip(batches, masks)]
    _, n = trainer.get_batch_samples(iter(plain), 2, torch.device("cpu"))
    assert int(n) == 2 * 4 * 11 - 4 * 4


def _distill_ddp(out_dir: str) -> None:
    """One rank of test_ddp_gradients_are_all_reduced (run by torchrun)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    student = _llama(32, seed=3)
    trainer = _trainer(out_dir, student, mtbkd.MTBKDLoss(), steps=1, bs=2, lr=1.0, optim="sgd",
                       data=_data(4, ragged=True), ddp_backend="gloo")  # fmt: skip
    trainer.args.max_grad_norm = 0.0
    trainer.train()
    flat = _flat(student)
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    if dist.get_rank() == 0:
        torch.save(torch.stack(every), Path(out_dir) / "params.pt")
    # a rank that exits with the group alive can abort in gloo's teardown ("terminate called
    # without an active exception"), and one whose DDP reducer is freed after the group is gone
    # can hang in its destructor (one run in four on a loaded machine): free the trainer, close
    # the group on every rank, then leave without running any other destructor
    del trainer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_gradients_are_all_reduced(tmp_path):
    """Two CPU processes (gloo) with 2 rows each take the step of one process with all 4 rows."""
    root = Path(mtbkd.__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(tmp_path)]  # fmt: skip
    run = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = torch.load(tmp_path / "params.pt")
    torch.testing.assert_close(ranks[0], ranks[1], rtol=0, atol=0)
    student = _llama(32, seed=3)
    trainer = _trainer(tmp_path / "one", student, mtbkd.MTBKDLoss(), steps=1, bs=4, lr=1.0,
                       optim="sgd", data=_data(4, ragged=True))  # fmt: skip
    trainer.args.max_grad_norm = 0.0
    trainer.train()
    torch.testing.assert_close(ranks[0], _flat(student), rtol=1e-4, atol=1e-5)


class _SoftCapped(transformers.LlamaForCausalLM):
    """A model that soft-caps its logits without saying so in its config."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 30.0 * torch.tanh(out.logits / 30.0)
        return out


def test_transformed_logits_are_refused(tmp_path):
    batch = _batch()
    torch.manual_seed(0)
    cfg = transformers.GraniteConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        logits_scaling=8.0, tie_word_embeddings=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="logits_scaling=8.0"):
        hidden_and_head(transformers.GraniteForCausalLM(cfg), batch)
    with pytest.raises(ValueError, match="transforms its logits"):
        hidden_and_head(_llama(32, cls=_SoftCapped), batch)
    capped = _llama(32)  # a multimodal model keeps the soft-cap under text_config
    capped.config.text_config = types.SimpleNamespace(final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        hidden_and_head(capped, batch)
    # The trainer checks teachers too.
    student = _llama(32, seed=3)
    trainer = MultiTeacherDistillationTrainer(
        model=student, teachers=[_llama(48, cls=_SoftCapped)],
        args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
    )  # fmt: skip
    with pytest.raises(ValueError, match="transforms its logits"):
        trainer.compute_loss(student, batch)


def test_peft_lora_student(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    batch = _batch()
    student = peft.get_peft_model(
        _llama(32, seed=3), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    h, w, b = hidden_and_head(student, batch)
    assert h.shape == (8, 12, 32) and w.shape == (V, 32)
    trainer = _trainer(tmp_path, student, mtbkd.MTBKDLoss(), steps=2, lr=1e-1)
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        t_logits = [t(input_ids=batch["input_ids"]).logits[..., :V] for t in trainer.teachers]
    ref = mtbkd.mtbkd_loss(student(input_ids=batch["input_ids"]).logits, t_logits,
                           _shift(batch["labels"]))  # fmt: skip
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    lora = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_B" in n}
    trainer.train()
    assert all(not torch.equal(p, lora[n]) for n, p in student.named_parameters() if n in lora)
    # LoRA on the output head changes the logits beyond hidden @ weight.T: refused.
    on_head = peft.get_peft_model(_llama(32), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="adapter"):
        hidden_and_head(on_head, batch)


def test_evaluate_and_predict(tmp_path):
    student = _llama(32, seed=3)
    trainer = _trainer(tmp_path, student, mtbkd.MTBKDLoss(), steps=1)
    rows = _data(8, seed=5)
    batch = _stack(rows)
    with torch.no_grad():
        ref = trainer.compute_loss(student, batch).item()
        logits = student(input_ids=batch["input_ids"]).logits
    assert trainer.evaluate(rows)["eval_loss"] == pytest.approx(ref, rel=1e-5)
    out = trainer.predict(rows)
    assert out.metrics["test_loss"] == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(torch.as_tensor(out.predictions), logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.as_tensor(out.label_ids), batch["labels"])
    loss, outputs = trainer.compute_loss(student, batch, return_outputs=True)
    assert outputs.loss is loss and outputs.logits.shape == (8, 12, V)


def test_needs_teachers(tmp_path):
    with pytest.raises(ValueError, match="teachers"):
        MultiTeacherDistillationTrainer(model=_llama(32), teachers=[], loss=mtbkd.MTBKDLoss())
    # before: "object of type 'LlamaForCausalLM' has no len()"
    with pytest.raises(TypeError, match="teachers must be a sequence of models"):
        MultiTeacherDistillationTrainer(model=_llama(32), teachers=_llama(48))


def test_inputs_the_trainer_cannot_use_are_refused(tmp_path):
    # found by a bug hunt: pixel_values were dropped (training ran text-only), the student's
    # inputs_embeds went to every teacher, and a teacher with a smaller vocabulary failed with
    # an IndexError inside its embedding
    student = _llama(32, seed=3)
    trainer = _trainer(tmp_path, student, mtbkd.MTBKDLoss(), steps=1)
    batch = _batch()
    with pytest.raises(ValueError, match=r"does not forward: \['pixel_values'\]"):
        trainer.compute_loss(student, {**batch, "pixel_values": torch.zeros(8, 3, 4, 4)})
    # segment ids were dropped silently; all-zero ones (a tokenizer's single texts) still are
    with pytest.raises(ValueError, match="token_type_ids: the batch has segment ids other than 0"):
        trainer.compute_loss(student, {**batch, "token_type_ids": torch.ones(8, 12).long()})
    zero = {
        **batch,
        "token_type_ids": torch.zeros(8, 12).long(),
        "special_tokens_mask": batch["attention_mask"],
    }
    assert torch.equal(trainer.compute_loss(student, zero), trainer.compute_loss(student, batch))
    embeds = student.get_input_embeddings()(batch["input_ids"])
    no_ids = {k: v for k, v in batch.items() if k != "input_ids"}
    with pytest.raises(ValueError, match="inputs_embeds: the teachers embed tokens"):
        trainer.compute_loss(student, {**no_ids, "inputs_embeds": embeds})
    trainer.teachers.append(_llama(40, vocab=V - 8, seed=4))
    with pytest.raises(ValueError, match=r"teachers\[2\]'s input embeddings cover 56 tokens"):
        trainer.compute_loss(student, batch)


def test_masked_lm_teacher_or_student_is_refused(tmp_path):
    # found by a bug hunt: a BERT masked-LM teacher was distilled from as if its position t
    # predicted token t + 1 (it predicts token t, having seen it)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)  # fmt: skip
    student = _llama(32, seed=3)
    trainer = _trainer(tmp_path, student, mtbkd.MTBKDLoss(), steps=1)
    trainer.teachers.append(transformers.BertForMaskedLM(cfg).eval())
    with pytest.raises(ValueError, match="BertForMaskedLM is a masked language model"):
        trainer.compute_loss(student, _batch())
    with pytest.raises(ValueError, match="BertForMaskedLM is a masked language model"):
        hidden_and_head(transformers.BertForMaskedLM(cfg), _batch())
    # a causal BERT (is_decoder) is registered as a causal LM and passes the check
    causal = transformers.BertLMHeadModel(
        transformers.BertConfig(**{**cfg.to_dict(), "is_decoder": True})
    )
    hidden, weight, _ = hidden_and_head(causal, _batch())
    assert hidden.shape == (8, 12, 32) and weight.shape == (V, 32)


def test_loss_options_of_the_trainer_are_refused(tmp_path):
    """Options that change the stock Trainer's loss are refused, not silently ignored."""
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        _trainer(tmp_path, _llama(32), mtbkd.MTBKDLoss(), steps=1, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="compute_loss_func"):
        MultiTeacherDistillationTrainer(
            model=_llama(32), teachers=[_llama(48)], compute_loss_func=lambda *a, **k: 0,
            args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                report_to=[]),
        )  # fmt: skip


def _mixtral():
    torch.manual_seed(3)
    cfg = transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.5,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(cfg).float()


def test_moe_router_aux_loss(tmp_path):
    """An MoE student's load-balancing loss is added as its own loss adds it (coef * aux), and
    averaged over the accumulated micro-batches."""
    data = _data(4, ragged=True)
    batch = _stack(data)
    student = _mixtral()
    trainer = _trainer(tmp_path, student, mtbkd.MTBKDLoss(), steps=1, bs=2, ga=2, lr=1.0,
                       optim="sgd", data=data)  # fmt: skip
    trainer.args.max_grad_norm = 0.0

    def reference(model):
        with torch.no_grad():
            t_logits = [t(input_ids=batch["input_ids"]).logits[..., :V] for t in trainer.teachers]
        loss = mtbkd.mtbkd_loss(model(input_ids=batch["input_ids"]).logits, t_logits,
                                _shift(batch["labels"]))  # fmt: skip
        halves = batch["input_ids"].split(2)  # the two accumulated micro-batches
        return loss, (model(input_ids=halves[0]).aux_loss + model(input_ids=halves[1]).aux_loss) / 2

    loss, aux = reference(student)
    assert float(aux.detach()) > 0.1
    got = trainer.compute_loss(student, batch)
    torch.testing.assert_close(got, loss + 0.5 * student(input_ids=batch["input_ids"]).aux_loss,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    trainer.train()
    expected = _mixtral()
    loss, aux = reference(expected)
    (loss + 0.5 * aux).backward()
    with torch.no_grad():
        for p in expected.parameters():
            p -= p.grad
    torch.testing.assert_close(_flat(student), _flat(expected), rtol=1e-4, atol=1e-5)


def test_num_items_with_the_losss_own_ignore_index(tmp_path):
    # the count compared the targets with -100, which _targets had already replaced by the loss's
    # ignore_index: every row was counted, masked or not
    trainer = _trainer(tmp_path, _llama(32, seed=3), mtbkd.MTBKDLoss(ignore_index=-1), steps=1)
    rows = _data(8, ragged=True)
    batches = [_stack(rows[:4]), _stack(rows[4:])]
    expected = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert expected < 8 * 12
    _, n = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    assert int(n) == expected
    # the teachers are frozen, in eval mode
    for t in trainer.teachers:
        assert not t.training and not any(p.requires_grad for p in t.parameters())


class _HeadTwice(torch.nn.Module):
    """A toy causal LM whose forward calls its output head twice."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 8)
        self.head = torch.nn.Linear(8, V)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.emb(input_ids)
        return types.SimpleNamespace(logits=self.head(h) + self.head(h))


def test_a_head_called_twice_is_refused():
    with pytest.raises(ValueError, match="called its output head 2 times"):
        hidden_and_head(_HeadTwice(), _batch(), check=False)


def test_trainer_refuses_a_loss_that_is_not_a_mean():
    for loss in (mtbkd.MTBKDLoss(reduction="sum"), mtbkd.MultiTeacherKDLoss(reduction="none")):
        with pytest.raises(ValueError, match="reduction='mean'"):
            MultiTeacherDistillationTrainer(model=_llama(32), teachers=[_llama(48)], loss=loss)


if __name__ == "__main__":  # a rank of test_ddp_gradients_are_all_reduced, started by torchrun
    _distill_ddp(sys.argv[1])


def test_returned_outputs_hold_the_last_positions_own_logits():
    # an audit: with check=True the outputs' logits were the probe's (magnitude 1000)
    model = _llama(16).eval()
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        for check in (True, False):
            *_, out = hidden_and_head(model, {"input_ids": ids}, return_outputs=True, check=check)
            torch.testing.assert_close(out.logits, full[:, -1:], rtol=1e-5, atol=1e-5)
            assert out["logits"] is out.logits
