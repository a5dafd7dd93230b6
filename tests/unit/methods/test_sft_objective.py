"""SFT's fused loss (trained positions only, LM head in chunks) equals the model's own loss."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmpipeline.methods.logprobs import fused_head_usable
from lmpipeline.methods.sft import SFTObjective


def _model(tie: bool):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).float()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a masked prompt
    labels[2, 9:] = -100  # and padding on the last row
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_fused_loss_and_gradients_equal_the_models_own_loss():
    for tie in (True, False):
        batch = _batch()
        results = []
        for fused in (False, True):
            model = _model(tie)
            assert fused_head_usable(model)
            obj = SFTObjective(fused=fused)
            total = float(obj.count(batch)) + 5.0  # as if other micro-batches shared the step
            loss, sums = obj.loss(model, batch, total)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((loss.detach(), sums, grads))
        (l0, s0, g0), (l1, s1, g1) = results
        assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
        assert s0["units"] == s1["units"] and abs(s0["loss"] - s1["loss"]) < 1e-4
        for name in g0:
            assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-6), name
