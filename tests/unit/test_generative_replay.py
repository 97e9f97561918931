"""Generative replay: the pseudo-example format filter, batch mixing, and no raw example kept."""

import random
from types import SimpleNamespace

from retain.streams.task import Example, Item, Task
from retain.strategies.generative_replay import (GenerativeReplay, GenerativeReplayOptions, PseudoFormat,
                                                 gen_prefix)


class _Tok:
    eos_token = "</s>"

    def apply_chat_template(self, *a, **k):  # pragma: no cover - plain-format tasks only here
        raise AssertionError


def test_format_filter_keeps_only_examples_that_parse_into_the_task():
    task = Task("parity", [Example("Is 4 even?", "yes", ("yes", "no"))], [], metric="choice",
                template="{input}\nAnswer:")
    fmt = PseudoFormat(task, _Tok())
    item = fmt.parse("Is 12 even?\nAnswer: yes</s>junk")
    assert item == Item("parity", "Is 12 even?\nAnswer:", " yes")
    assert fmt.parse("Is 12 even?\nAnswer: maybe") is None  # not in the label set
    assert fmt.parse("Is 12 even? yes") is None              # the template's answer cue is missing
    assert fmt.parse("\nAnswer: yes") is None                # empty input
    assert fmt.parse("Is 12 even?\nAnswer: ") is None        # empty answer


def test_batches_mix_pseudo_examples_and_generation_targets():
    gr = GenerativeReplay(GenerativeReplayOptions(ratio=0.25, gen_fraction=0.25))
    gr._rng = random.Random(0)
    gr.pseudo = [Item("old", "p?", " yes")]
    batch = [Item("new", f"q{i}", f" a{i}") for i in range(8)]
    (out,) = list(gr.batches(None, [SimpleNamespace(name="new")], iter([batch])))
    assert len(out) == 8
    assert sum(it.task == "old" for it in out) == 2
    gens = [it for it in out if it.prompt == gen_prefix("new")]
    assert len(gens) == 2 and gens[0].target == " q0 a0"
    assert len(gr.pseudo) == 1  # training examples never enter the memory


def test_pseudo_examples_come_from_generation_and_the_memory_holds_no_raw_example():
    import torch

    from retain.models import load_model

    _, tok = load_model("tiny-random", seed=0)
    task = Task("parity", [Example("Is 4 even?", "yes", ("yes", "no"))], [], metric="choice",
                template="{input}\nAnswer:")
    outputs = ["Is 12 even?\nAnswer: yes", "garbage without the cue", "Is 4 even?\nAnswer: maybe"]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.calls = 0

        def generate(self, input_ids, **kw):
            rows = [tok(" " + outputs[(self.calls + i) % 3] + tok.eos_token, add_special_tokens=False)["input_ids"]
                    for i in range(input_ids.shape[0])]
            self.calls += input_ids.shape[0]
            width = max(map(len, rows))
            pad = [r + [tok.pad_token_id] * (width - len(r)) for r in rows]
            return torch.cat([input_ids, torch.tensor(pad)], dim=1)

    gr = GenerativeReplay(GenerativeReplayOptions(samples_per_task=6))
    gr.trained = ["parity"]
    ctx = SimpleNamespace(model=Model(), tokenizer=tok, phase=1, phase_seed=1, config=SimpleNamespace(seed=0),
                          stream=SimpleNamespace(tasks=[task, Task("next", [], [])]))
    gr.before_task(ctx, [ctx.stream.tasks[1]])
    assert gr._counts["parity"] == {"generated": 6, "kept": 2}
    assert {(i.prompt, i.target) for i in gr.pseudo} == {("Is 12 even?\nAnswer:", " yes")}
    raw = {(i.prompt, i.target) for i in task.items(tok)}
    assert not raw & {(i.prompt, i.target) for i in gr.pseudo}
    assert gr.state_dict()["pseudo"] == [["parity", "Is 12 even?\nAnswer:", " yes"]] * 2


def test_chat_format_examples_are_generated_past_the_end_of_the_user_turn():
    """The chat template closes the user turn with the eos token; sampling must not stop there."""
    from retain.models import load_model

    model, tok = load_model("tiny-random", seed=0)
    task = Task("parity", [Example("Is 4 even?", "yes", ("yes", "no"))], [], metric="choice", template="{input}",
                format="chat")
    example = Item("parity", task.prompt(tok, Example("Is 12 even?", "")), task.target("yes"))
    assert tok.eos_token in example.prompt  # the case at hand: eos in the middle of an example
    # What generation training teaches: the whole example, then the eos that ends every target.
    script = tok(" " + example.prompt + example.target + tok.eos_token, add_special_tokens=False)["input_ids"]
    prefix_len = len(tok(gen_prefix("parity"))["input_ids"])
    real_forward = model.forward

    def scripted(*args, **kwargs):  # the real model and generate(), with the next token dictated
        out = real_forward(*args, **kwargs)
        step = kwargs["attention_mask"].shape[1] - prefix_len
        out.logits[:, -1, :] = float("-inf")
        out.logits[:, -1, script[min(step, len(script) - 1)]] = 0.0
        return out

    model.forward = scripted
    gr = GenerativeReplay(GenerativeReplayOptions(samples_per_task=2, max_new_tokens=len(script) + 2))
    kept, made = gr.sample(SimpleNamespace(model=model, tokenizer=tok), task)
    assert made == 2 and [(i.prompt, i.target) for i in kept] == [(example.prompt, example.target)] * 2


def test_generative_replay_run_records_generated_and_kept(tiny_config):
    from retain.checkpoint import load_state
    from retain.config import load_config
    from retain.loop import execute, run_dir_for

    cfg = load_config(tiny_config("gr", strategy="generative-replay", train__max_steps=3,
                                  generative_replay={"samples_per_task": 8, "max_new_tokens": 12}))
    results = execute(cfg, quiet=True)
    counts = results["strategy_stats"][-1]["generative-replay"]["pseudo_examples"]
    assert counts["upper"]["generated"] == 8 and 0 <= counts["upper"]["kept"] <= 8
    state = load_state(run_dir_for(cfg)).strategy["generative-replay"]
    assert state["trained"] == ["upper", "small"] and len(state["pseudo"]) == counts["upper"]["kept"]
