import torch

from retain.batching import collate
from retain.embeddings import ModelWrapper
from retain.lm_loss import lm_outputs, target_columns
from retain.models import load_model
from retain.strategies import StrategyStack
from retain.strategies.base import parse_strategy
from retain.streams.task import Item

ITEMS = [Item("t", "a short prompt", " yes"), Item("t", "a much longer prompt with many more words in it", " no way"),
         Item("t", "mid length prompt here", " maybe")]


def _batch(tok, items=ITEMS):
    return collate(tok, items, 128)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def test_target_columns_are_the_positions_that_predict_a_label():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, -100, 7]])
    assert target_columns(labels).tolist() == [1, 2, 3]


def test_loss_and_gradients_equal_the_full_vocabulary_path():
    model, tok = load_model("tiny-random")
    batch = _batch(tok)
    lean = lm_outputs(model, batch)
    full = model(**batch)
    width = batch["input_ids"].shape[1]
    # only the answer columns were projected onto the vocabulary
    assert lean.logits.shape[1] == len(target_columns(batch["labels"])) < width
    assert full.logits.shape[1] == width
    assert torch.allclose(lean.loss, full.loss, atol=1e-6)
    for a, b in zip(_grads(model, lean.loss), _grads(model, model(**batch).loss)):
        assert torch.allclose(a, b, atol=1e-6)


def test_num_items_divides_the_sum_as_transformers_does():
    model, tok = load_model("tiny-random")
    batch = _batch(tok)
    lean = lm_outputs(model, batch, num_items=50)
    full = model(**batch, num_items_in_batch=50)
    assert torch.allclose(lean.loss, full.loss, atol=1e-6)
    assert not torch.allclose(lean.loss, lm_outputs(model, batch).loss)


def test_full_logits_when_asked_or_when_a_wrapper_rewrites_the_input():
    model, tok = load_model("tiny-random")
    batch = _batch(tok)
    width = batch["input_ids"].shape[1]
    assert lm_outputs(model, batch, full_logits=True).logits.shape[1] == width

    class Passthrough(ModelWrapper):
        def forward(self, **kwargs):
            assert "logits_to_keep" not in kwargs
            return self.base(**kwargs)

    assert lm_outputs(Passthrough(model), batch).logits.shape[1] == width


def test_a_batch_without_labels_takes_the_full_path():
    model, tok = load_model("tiny-random")
    batch = _batch(tok, [Item("t", "p", " q", lm_loss=False)])
    assert lm_outputs(model, batch).logits.shape[1] == batch["input_ids"].shape[1]


def _stack(spec: str) -> StrategyStack:
    return StrategyStack([klass() for klass in parse_strategy(spec)])


def test_distilling_strategies_get_every_positions_logits():
    assert _stack("lora+lwf").reads_all_logits
    assert _stack("lora+distill-replay").reads_all_logits
    assert not _stack("lora+replay+ewc").reads_all_logits
