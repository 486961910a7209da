"""Pairwise-RL maths against SPEC §2's hand values, and the judge's label logit read at the
position that predicts the answer (stub models whose logits are known by construction)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.judging import Judge, JudgeFormat, next_token_logits
from trainers.losses.pairwise import (
    anchor_advantages,
    gae,
    judge_loss,
    pairwise_accuracy,
    position_consistency,
    preference_probability,
    symmetrised,
    terminal_rewards,
    value_loss,
)
from trainers.losses.policy import clipped_objective, grpo_token_loss


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def label_logits(gaps: list[float], vocab: int = 4, yes: int = 1, no: int = 2) -> torch.Tensor:
    """[B, V] logits with ℓ_yes − ℓ_no = gap and every other token at −inf."""
    out = torch.full((len(gaps), vocab), -math.inf)
    out[:, yes] = torch.tensor(gaps)
    out[:, no] = 0.0
    return out


def test_probability_and_symmetrised_judgment_hand_values():
    # σ(2) = 1 / (1 + e^-2) = 0.880797
    assert float(preference_probability(torch.tensor(2.0), torch.tensor(0.0))) == \
        pytest.approx(0.8808, abs=1e-4)
    # p(a≻b) = σ(2) = 0.8808, p(b≻a) = σ(−1) = 0.2689: P̄ = ½(0.8808 + 1 − 0.2689) = 0.8060
    p_ab = preference_probability(torch.tensor(5.0), torch.tensor(3.0))
    p_ba = preference_probability(torch.tensor(0.0), torch.tensor(1.0))
    assert float(p_ba) == pytest.approx(0.2689, abs=1e-4)
    assert float(symmetrised(p_ab, p_ba)) == pytest.approx(0.8060, abs=1e-4)
    assert float(position_consistency(p_ab, p_ba)) == pytest.approx(0.8808 + 0.2689 - 1, abs=1e-4)


def test_judge_loss_hand_value_both_forms():
    # p(w≻l) = 0.8, p(l≻w) = 0.4: ½(−log 0.8 − log 0.6) = ½(0.2231 + 0.5108) = 0.3670
    wl, lw = label_logits([logit(0.8)]), label_logits([logit(0.4)])
    two_way = judge_loss(wl, lw, yes_id=1, no_id=2, loss="two_way")
    assert float(two_way) == pytest.approx(0.3670, abs=1e-4)
    # only the label tokens carry mass: the full-vocabulary cross-entropy is the same number
    assert float(judge_loss(wl, lw, 1, 2, "full_vocab")) == pytest.approx(0.3670, abs=1e-4)
    # a third token with logit 0 takes mass: full_vocab softmax over (ℓ_yes, 0, 0) at wl:
    # ℓ_yes = log 4 -> 4/6; at lw ℓ_yes = log(2/3) -> no = 1/(2/3 + 2) = 0.375
    wl[:, 3], lw[:, 3] = 0.0, 0.0
    expected = -0.5 * (math.log(4 / 6) + math.log(1 / (2 / 3 + 2)))
    assert float(judge_loss(wl, lw, 1, 2, "full_vocab")) == pytest.approx(expected, abs=1e-5)
    assert float(judge_loss(wl, lw, 1, 2, "two_way")) == pytest.approx(0.3670, abs=1e-4)
    # consistency penalty λ(p(w≻l) + p(l≻w) − 1)² = 0.5 · 0.2² = 0.02
    penalised = judge_loss(wl, lw, 1, 2, "two_way", consistency_weight=0.5)
    assert float(penalised) == pytest.approx(0.3670 + 0.02, abs=1e-4)


@pytest.mark.parametrize("ratio, advantage, value, slope", [
    (1.3, +1.0, 1.2, 0.0),    # clipped at 1 + ε: no gradient
    (0.7, +1.0, 0.7, 1.0),    # below 1 − ε with a positive advantage: unclipped
    (0.7, -1.0, -0.8, 0.0),   # clipped at 1 − ε on a negative advantage: no gradient
    (1.3, -1.0, -1.3, -1.0),  # above 1 + ε with a negative advantage: unclipped
])
def test_clip_table(ratio, advantage, value, slope):
    rho = torch.tensor(ratio, requires_grad=True)
    objective = clipped_objective(rho, torch.tensor(advantage), 0.2, 0.2)
    objective.backward()
    assert float(objective.detach()) == pytest.approx(value)
    assert float(rho.grad) == pytest.approx(slope)


def test_symmetrised_is_exactly_a_half_on_itself_and_sums_to_one():
    generator = torch.Generator().manual_seed(0)
    gaps = 10 * torch.randn(1000, generator=generator)
    p = torch.sigmoid(gaps)
    assert torch.equal(symmetrised(p, p), torch.full_like(p, 0.5))  # P̄(y≻y) = ½ exactly
    q = torch.sigmoid(10 * torch.randn(1000, generator=generator))
    total = symmetrised(p.double(), q.double()) + symmetrised(q.double(), p.double())
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-12, rtol=0)
    # accuracy: chosen preferred -> 1, tie -> ½
    acc = pairwise_accuracy(torch.tensor([0.9, 0.3, 0.6]), torch.tensor([0.2, 0.8, 0.6]))
    assert acc.tolist() == [1.0, 0.0, 0.5]


class StubLM(torch.nn.Module):
    """A causal LM stand-in whose next-token logits are known: at position t, ℓ_yes = the input
    token id at t (+ `bias`), every other logit 0. So the logit read for the answer shows which
    position it came from."""

    def __init__(self, vocab: int, yes: int, bias: float = 0.0):
        super().__init__()
        self.vocab, self.yes, self.bias = vocab, yes, bias
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device for Judge

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.yes] = input_ids.float() + self.bias
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep
                                else logits})()


def test_label_logit_is_read_after_the_last_real_token():
    stub = StubLM(vocab=50, yes=3)
    # left-padded: the last column is every row's last real token (a right-padded batch, or
    # an offset of one, would read 0 (pad) or the token before it: 7 / 3)
    logits = next_token_logits(stub, [[5, 7, 9], [3, 4], [11]], pad_id=0, device="cpu")
    assert logits[:, 3].tolist() == [9.0, 4.0, 11.0]


def test_a_pure_position_bias_gives_a_half(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fmt = JudgeFormat(labels=("Y", "N"))
    yes = tokenizer("Y", add_special_tokens=False)["input_ids"][0]

    class AlwaysYes(StubLM):  # "Response A is better", whatever A and B are
        def forward(self, input_ids, *args, **kwargs):
            out = super().forward(torch.zeros_like(input_ids), *args, **kwargs)
            return out

    judge = Judge(AlwaysYes(len(tokenizer), yes, bias=4.0), tokenizer, fmt)
    p_ab, p_ba = judge.compare(["2+2?", "q"], ["4", "a"], ["5", "b"])
    assert p_ab.tolist() == pytest.approx([1 / (1 + math.exp(-4))] * 2)  # it does prefer A
    assert judge.preference(["2+2?", "q"], ["4", "a"], ["5", "b"]).tolist() == [0.5, 0.5]


def test_judge_reads_the_real_models_answer_logits(tiny_model):
    """Batched, left-padded scoring equals an unpadded forward's last-position logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    judge = Judge(model, tokenizer, JudgeFormat(labels=("Y", "N")), batch_size=3)
    questions, ys, others = ["What is 2 plus 2?", "Hi"], ["2 + 2 = 4\n#### 4", "x"], \
        ["#### 5", "a much longer other response here"]
    p_ab, p_ba = judge.compare(questions, ys, others)
    expected = []
    for q, y, o in zip(questions, ys, others):
        for a, b in ((y, o), (o, y)):
            ids = torch.tensor([judge.encode(q, a, b)])
            with torch.no_grad():
                last = model(input_ids=ids).logits[0, -1]
            expected.append(float(torch.sigmoid(last[judge.yes] - last[judge.no])))
    got = torch.stack([p_ab, p_ba], 1).flatten().tolist()
    assert got == pytest.approx(expected, abs=1e-5)
    text = tokenizer.decode(judge.encode(questions[0], ys[0], others[0]))
    assert text.endswith("Answer Y or N.<|im_end|>\n<|im_start|>assistant\n")


def test_gae_hand_values_and_the_anchor_special_case():
    # V = (0.5, 0.6, 0.7), reward 1 at the last token, γ = 1, λ = 0.95:
    # δ = (0.6 − 0.5, 0.7 − 0.6, 1 − 0.7) = (0.1, 0.1, 0.3)
    # A2 = 0.3, A1 = 0.1 + 0.95·0.3 = 0.385, A0 = 0.1 + 0.95·0.385 = 0.46575
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0]])  # 9: off the completion, ignored
    rewards = terminal_rewards(torch.tensor([1.0]), mask)
    assert rewards.tolist() == [[0, 0, 0, 1, 0]]
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0, 0.46575, 0.385, 0.3, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[0, 0.96575, 0.985, 1.0, 0]]))
    # V ≡ ½ and λ = 1: every token's advantage is r − ½, the `anchor` advantage
    r = torch.tensor([0.8, 0.1])
    mask2 = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv2, _ = gae(terminal_rewards(r, mask2), torch.full((2, 3), 0.5), mask2, 1.0, 1.0)
    expected = anchor_advantages(r).unsqueeze(1) * mask2
    torch.testing.assert_close(adv2, expected)
    # ½ Σ (V − R)² / tokens = ½ (0.25 + 0.25) / 2
    loss = value_loss(torch.tensor([[0.5, 1.0]]), torch.tensor([[1.0, 0.5]]),
                      torch.ones(1, 2))
    assert float(loss) == pytest.approx(0.125)


def test_grpo_loss_takes_per_token_advantages():
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = grpo_token_loss(logp, logp.detach(), None, torch.tensor([[1.0, -2.0, 0.5]]),
                              torch.ones(1, 3), aggregation="bnpo")
    loss.backward()
    # ratio 1: the gradient of −mean(A·c) with respect to log π is −A / 3
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, 2 / 3, -0.5 / 3]]))
