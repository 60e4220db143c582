"""The lm-eval Evaluator on a tiny in-memory Llama with a character tokenizer (offline, CPU, seconds)."""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from evomerge.genomes import cost_measure  # noqa: E402
from evomerge.genomes.base import nonzero_params as count_nonzero_params  # noqa: E402
from evomerge.objectives import EvaluationError, Evaluator, ObjectiveResult  # noqa: E402
from evomerge.space import Objective  # noqa: E402

TASKS = Path(__file__).parent / "fixtures" / "tasks"
CHARS = string.ascii_letters + string.digits + " :=+-\n"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
VOCAB = {c: i for i, c in enumerate(SPECIALS + list(CHARS))}


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama(seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=VOCAB["<s>"],
        eos_token_id=VOCAB["</s>"],
        pad_token_id=VOCAB["<pad>"],
    )
    return LlamaForCausalLM(cfg).eval()


def make_bigram(model, mapping: dict[str, str]) -> None:
    """Rewrite the weights IN PLACE so that the next token depends only on the current one.

    Attention and MLP outputs are zeroed (the residual stream is the token's embedding), embeddings are
    one-hot, and the head maps token x to mapping[x]. Capitals map to their lower case, lower case to
    "\\n": prompted with "lower A" the model answers "a" and stops, i.e. exactly right.
    """
    v = model.config.vocab_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, :v].copy_(torch.eye(v))
        model.model.norm.weight.fill_(1.0)
        head = model.lm_head.weight
        head.zero_()
        for x, y in mapping.items():
            head[VOCAB[y], VOCAB[x]] = 1.0


LOWER = {c: c.lower() for c in string.ascii_uppercase} | {c: "\n" for c in string.ascii_lowercase}

OBJECTIVES = [
    Objective(name="letters", task="evomerge_test_letters", metric="exact_match,none"),
    Objective(name="mixed", task="evomerge_test_mixed", metric="exact_match,none", limit=6),
    Objective(name="size", kind="cost", measure="params", direction="minimize"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: extra threads only contend with the other processes on a small machine.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def evaluator(tok, tmp_path_factory):
    return Evaluator(OBJECTIVES, [str(TASKS)], tok, batch_size=8, cache_dir=str(tmp_path_factory.mktemp("c")),
                     measure=cost_measure)


def check_consistent(res: dict[str, ObjectiveResult], n: dict[str, int]) -> None:
    for name, count in n.items():
        r = res[name]
        assert len(r.samples) == count
        assert set(r.samples) <= {0.0, 1.0}
        assert r.value == pytest.approx(sum(r.samples) / count)


def test_keys_samples_and_in_place_updates(evaluator):
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}

    first = evaluator.evaluate(model)
    assert list(first) == ["letters", "mixed", "size"]
    check_consistent(first, {"letters": 10, "mixed": 6})
    assert first["letters"].value < 1.0  # a random model does not solve it
    assert first["size"].value == count_nonzero_params(model)

    make_bigram(model, LOWER)  # same model object, weights rewritten in place (as the materializer does)
    second = evaluator.evaluate(model)
    check_consistent(second, {"letters": 10, "mixed": 6})
    assert second["letters"].value == 1.0 and second["letters"].samples == [1.0] * 10
    assert second["mixed"].samples == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # document order
    assert second["mixed"].value == 0.5
    assert second["size"].value < first["size"].value

    with torch.no_grad():  # back to the random weights: the first results again, nothing cached
        for k, v in model.state_dict().items():
            v.copy_(original[k])
    third = evaluator.evaluate(model)
    assert third == first


def test_matches_plain_lm_eval_and_other_models(evaluator, tok):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    solved, rand = tiny_llama(), tiny_llama(seed=1)
    make_bigram(solved, LOWER)
    objs = [Objective(name="mixed", task="evomerge_test_mixed", metric="exact_match,none")]
    a = evaluator.evaluate(solved, objs)["mixed"]
    b = evaluator.evaluate(rand, objs)["mixed"]  # a different model object: a fresh HFLM
    c = evaluator.evaluate(solved, objs)["mixed"]
    assert a == c and a.value == 0.5 and len(a.samples) == 10
    assert b.value < 0.5

    # The same numbers as a plain lm-eval run (from the task directory, where relative paths work).
    cwd = os.getcwd()
    os.chdir(TASKS)
    try:
        out = lm_eval.simple_evaluate(
            model=HFLM(pretrained=solved, tokenizer=tok, batch_size=8),
            tasks=["evomerge_test_mixed"],
            task_manager=TaskManager(include_defaults=False, include_path=str(TASKS)),
            log_samples=True,
            bootstrap_iters=0,
        )
    finally:
        os.chdir(cwd)
    assert out["results"]["evomerge_test_mixed"]["exact_match,none"] == a.value
    assert [
        s["exact_match"] for s in sorted(out["samples"]["evomerge_test_mixed"], key=lambda s: s["doc_id"])
    ] == a.samples


def test_two_limits_on_one_task(evaluator):
    model = tiny_llama()
    make_bigram(model, LOWER)
    objs = [
        Objective(name="all", task="evomerge_test_mixed", metric="exact_match,none"),
        Objective(name="first3", task="evomerge_test_mixed", metric="exact_match,none", limit=3),
        Objective(name="big", task="evomerge_test_letters", metric="exact_match,none", limit=1000),
    ]
    res = evaluator.evaluate(model, objs)
    assert res["all"].samples == [1.0, 0.0] * 5
    assert res["first3"].samples == [1.0, 0.0, 1.0]
    assert res["first3"].value == pytest.approx(2 / 3)
    assert len(res["big"].samples) == 10


def test_yaml_path_objective_from_another_cwd(tok, tmp_path, monkeypatch):
    # A task YAML given by path, with its data and include file beside it, used from an unrelated cwd.
    elsewhere = tmp_path / "tasks"
    (elsewhere / "data").mkdir(parents=True)
    shutil.copy(TASKS / "_template_yaml", elsewhere)
    shutil.copy(TASKS / "data" / "letters.jsonl", elsewhere / "data" / "x.jsonl")
    (elsewhere / "copy.yaml").write_text(
        "task: evomerge_test_copy\ninclude: _template_yaml\n"
        "dataset_kwargs:\n  data_files:\n    test: data/x.jsonl\n"
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    model = tiny_llama()
    make_bigram(model, LOWER)
    by_path = Objective(name="copy", task=str(elsewhere / "copy.yaml"), metric="exact_match,none", limit=4)
    ev = Evaluator([by_path], [], tok, batch_size=4)
    assert ev.evaluate(model)["copy"] == ObjectiveResult(1.0, [1.0] * 4)
    # the same file listed in task_paths makes its name usable
    ev2 = Evaluator([], [str(elsewhere / "copy.yaml")], tok, batch_size=4)
    by_name = Objective(name="copy", task="evomerge_test_copy", metric="exact_match,none", limit=2)
    assert ev2.evaluate(model, [by_name])["copy"].samples == [1.0, 1.0]
    # a space-relative YAML reference ("tasks/copy.yaml" beside the space file): via base_dir, or
    # found through the task directory's parent when base_dir is not given
    rel = Objective(name="copy", task="tasks/copy.yaml", metric="exact_match,none", limit=1)
    ev3 = Evaluator([rel], ["tasks"], tok, batch_size=4, base_dir=str(tmp_path))
    ev4 = Evaluator([rel], [str(elsewhere)], tok, batch_size=4)
    assert ev3.evaluate(model) == ev4.evaluate(model) == {"copy": ObjectiveResult(1.0, [1.0])}


def test_errors(tok, tmp_path):
    with pytest.raises(EvaluationError, match="unknown task 'no_such_task'"):
        Evaluator([Objective(name="x", task="no_such_task", metric="exact_match,none")], [str(TASKS)], tok, 4)
    with pytest.raises(EvaluationError, match="no metric 'acc'.*exact_match"):
        Evaluator(
            [Objective(name="x", task="evomerge_test_letters", metric="acc,none")], [str(TASKS)], tok, 4
        )
    with pytest.raises(EvaluationError, match="no filter 'strict-match'"):
        Evaluator(
            [Objective(name="x", task="evomerge_test_letters", metric="exact_match,strict-match")],
            [str(TASKS)],
            tok,
            4,
        )
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (TASKS / "_template_yaml").read_text()
        + "task: evomerge_test_bad\ndataset_kwargs:\n  data_files:\n    test: data/missing.jsonl\n"
    )
    with pytest.raises(EvaluationError, match="missing.jsonl"):
        Evaluator([Objective(name="x", task=str(bad), metric="exact_match,none")], [], tok, 4)
    with pytest.raises(EvaluationError, match="neither a directory nor a YAML file"):
        Evaluator([], [str(tmp_path / "nowhere")], tok, 4)


def test_cost_counts_nonzero_parameters_once():
    model = tiny_llama(tie=True)
    n = count_nonzero_params(model)
    unique = {id(p): p for p in model.parameters()}
    assert n == sum(int((p != 0).sum()) for p in unique.values())
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    assert count_nonzero_params(model) == n - model.model.layers[0].mlp.down_proj.weight.numel()


def test_quiet(evaluator, capfd):
    evaluator.evaluate(tiny_llama(), OBJECTIVES[:1])
    out, err = capfd.readouterr()
    assert "Running generate_until" not in err + out
    assert "Building contexts" not in err + out


def test_model_generation_config_does_not_override_task(evaluator):
    model = tiny_llama()
    make_bigram(model, LOWER)
    model.generation_config.max_new_tokens = 1  # the task's max_gen_toks (4) must decide, quietly
    res = evaluator.evaluate(model, OBJECTIVES[:1])
    assert res["letters"].value == 1.0
    assert model.generation_config.max_new_tokens == 1  # restored
