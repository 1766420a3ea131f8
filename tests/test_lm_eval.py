"""lm-evaluation-harness on a structlora adapter saved through PEFT: `simple_evaluate(model="hf",
model_args="pretrained=…,peft=…")` loads it with peft.PeftModel.from_pretrained (lm-eval's HFLM), which works once
structlora is imported in the process. Fully offline: a tiny local Llama and a local JSON-lines task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'structlora[lm-eval]'")
peft = pytest.importorskip("peft")

import structlora  # noqa: E402 - before lm-eval loads an adapter: registers structlora's methods with PEFT
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tiny_models import perturb_adapters, tiny_llama_for, tiny_word_tokenizer  # noqa: E402

TASK = "structlora_tiny_choice"
ROWS = [  # words from tiny_models.TINY_WORDS: the word-level tokenizer knows them all
    {"question": "the film was", "choices": ["good .", "bad .", "very boring ."], "label": 0},
    {"question": "the cat ran and the dog", "choices": ["ran .", "is boring ."], "label": 0},
    {"question": "i liked the book but she", "choices": ["hated it .", "liked it ."], "label": 0},
    {"question": "who saw the movie ?", "choices": ["we saw it .", "the plot ."], "label": 0},
    {"question": "this story is not", "choices": ["fun .", "very good .", "a cat ."], "label": 1},
    {"question": "the actors are", "choices": ["great .", "awful .", "the dog ."], "label": 1},
    {"question": "is the answer yes or no ?", "choices": ["yes .", "no ."], "label": 1},
    {"question": "a man and a woman", "choices": ["saw a film .", "ran ."], "label": 0},
]
METHODS = {
    "mtlora-icfm": lambda: structlora.MTLoraConfig(r=2, structure="icfm"),
    "loretta_rep": lambda: structlora.LorettaRepConfig(r=2, tensor_rank=2),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama folder (model + tokenizer) and an lm-eval task folder over a local JSON-lines file."""
    root = tmp_path_factory.mktemp("lm-eval")
    tokenizer = tiny_word_tokenizer()
    base = root / "tiny-llama"
    tiny_llama_for(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"  # datasets' json builder over a local file: no hub
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(rows))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return {"root": root, "base": base, "tasks": tasks}


def evaluate(workspace, adapter: Path | None = None) -> tuple[dict, list[list[float]]]:
    """lm-eval's own run on the local task; returns its results and, per row, its loglikelihood of each choice."""
    model_args = f"pretrained={workspace['base']},device=cpu,dtype=float32"
    if adapter is not None:
        model_args += f",peft={adapter}"
    # include_defaults=False: indexing lm-eval's ~thousands of built-in task files costs ~30 s and is not needed
    task_manager = TaskManager(include_path=str(workspace["tasks"]), include_defaults=False)
    results = simple_evaluate(model="hf", model_args=model_args, tasks=[TASK], task_manager=task_manager,
                              log_samples=True, batch_size=4)
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    assert [sample["doc"]["question"] for sample in samples] == [row["question"] for row in ROWS]
    return results, [[loglikelihood for loglikelihood, _ in sample["filtered_resps"]] for sample in samples]


def direct_loglikelihoods(model, tokenizer) -> list[list[float]]:
    """log p(" " + choice | question), summed over the choice's tokens, computed with the model itself: the
    question and the question+choice tokenized as lm-eval does (the continuation is what the whole adds)."""
    model.eval()
    per_row = []
    with torch.no_grad():
        for row in ROWS:
            context = tokenizer.encode(row["question"])
            values = []
            for choice in row["choices"]:
                whole = tokenizer.encode(row["question"] + " " + choice)
                assert whole[:len(context)] == context
                continuation = whole[len(context):]
                logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0, -len(continuation):]
                values.append(float(torch.log_softmax(logits.double(), -1)[range(len(continuation)),
                                                                             continuation].sum()))
            per_row.append(values)
    return per_row


@pytest.fixture(scope="module")
def base_run(workspace):
    return evaluate(workspace)


def test_lm_eval_base_run_matches_the_direct_loglikelihoods(workspace, base_run):
    """The direct computation below is what lm-eval computes: checked on the base alone first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, loglikelihoods = base_run
    expected = direct_loglikelihoods(AutoModelForCausalLM.from_pretrained(workspace["base"]),
                                     AutoTokenizer.from_pretrained(workspace["base"]))
    assert sum(map(len, loglikelihoods)) == sum(len(row["choices"]) for row in ROWS) == 19
    for got, want in zip(loglikelihoods, expected):
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_lm_eval_peft_argument_runs_the_structlora_adapter(method, workspace, base_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(workspace["base"]), METHODS[method]())
    perturb_adapters(model, scale=0.3)  # a stand-in for a trained adapter (a fresh one leaves the base unchanged)
    adapter = workspace["root"] / f"adapter-{method}"
    model.save_pretrained(str(adapter))
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"].startswith("STRUCTLORA_")

    results, loglikelihoods = evaluate(workspace, adapter)
    assert f"peft={adapter}" in results["config"]["model_args"]
    _, base_loglikelihoods = base_run
    changes = [abs(a - b) for row, base_row in zip(loglikelihoods, base_loglikelihoods) for a, b in zip(row, base_row)]
    assert min(changes) > 1e-3, f"the adapter left some loglikelihoods as the base's: {changes}"

    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace["base"]), str(adapter))
    expected = direct_loglikelihoods(loaded, AutoTokenizer.from_pretrained(workspace["base"]))
    for got, want in zip(loglikelihoods, expected):
        assert got == pytest.approx(want, abs=1e-5)
    accuracy = sum(max(range(len(row)), key=row.__getitem__) == ROWS[i]["label"]
                   for i, row in enumerate(expected)) / len(ROWS)
    assert results["results"][TASK]["acc,none"] == pytest.approx(accuracy, abs=1e-12)


def test_lm_eval_without_structlora_imported_says_to_import_it(workspace, tmp_path):
    """lm-eval's own process (its command line, a script) that never imports structlora: one KeyError from peft's
    config table that names the method and says to import structlora; nothing is evaluated."""
    adapter = tmp_path / "adapter"
    peft.get_peft_model(tiny_llama_for(tiny_word_tokenizer()), METHODS["mtlora-icfm"]()).save_pretrained(str(adapter))
    script = ("import sys\nfrom lm_eval import simple_evaluate\nfrom lm_eval.tasks import TaskManager\n"
              f"manager = TaskManager(include_path={str(workspace['tasks'])!r}, include_defaults=False)\n"
              "try:\n"
              f"    simple_evaluate(model='hf', model_args='pretrained={workspace['base']},peft={adapter},device=cpu',"
              f" tasks=[{TASK!r}], task_manager=manager)\n"
              "except KeyError as error:\n    print('KeyError', error)\n"
              "print('structlora imported:', 'structlora' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=str(tmp_path), env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "structlora imported: False", result.stdout + result.stderr[-3000:]
    assert lines[-2].startswith("KeyError 'STRUCTLORA_MTLORA") and "then import structlora" in lines[-2], \
        result.stdout + result.stderr[-3000:]



def test_readme_lm_eval_snippet_runs_as_written(workspace, base_run, tmp_path):
    """The README's lm-evaluation-harness snippet in a fresh process (`import structlora` first, then lm-eval,
    whose transformers asks `is_peft_available()` before peft is imported), with the tiny local model, the CPU and
    the local task in place of the hub model, the GPU and arc_easy; out/adapter is an MTLoRA adapter saved through
    PEFT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Use with PEFT, TRL, transformers", 1)[1].split("\n## ", 1)[0]
    code = next(block.split("```", 1)[0] for block in section.split("```python\n")[1:] if "simple_evaluate" in block)
    local_tasks = f"TaskManager(include_path={str(workspace['tasks'])!r}, include_defaults=False)"
    replacements = {'base_id = "HuggingFaceTB/SmolLM2-135M"': f"base_id = {str(workspace['base'])!r}",
                    "device=cuda": "device=cpu",
                    'tasks=["arc_easy"]': f"tasks=[{TASK!r}], task_manager={local_tasks}",
                    "from lm_eval import simple_evaluate\n": "from lm_eval import simple_evaluate\n"
                                                             "from lm_eval.tasks import TaskManager\n"}
    for old, new in replacements.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    code += ("import json, sys\n"
             f"samples = sorted(results['samples'][{TASK!r}], key=lambda sample: sample['doc_id'])\n"
             "print(json.dumps([[ll for ll, _ in sample['filtered_resps']] for sample in samples]))\n"
             "print('registered by the import hook:', 'structlora.peft_method' in sys.modules)\n")
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(workspace["base"]), METHODS["mtlora-icfm"]())
    perturb_adapters(model, scale=0.3, seed=1)
    model.save_pretrained(str(tmp_path / "out" / "adapter"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=str(tmp_path), env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                                    "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = result.stdout.strip().splitlines()
    assert lines and lines[-1] == "registered by the import hook: True", result.stdout + result.stderr[-3000:]
    got = json.loads(lines[-2])
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace["base"]),
                                            str(tmp_path / "out" / "adapter"))
    expected = direct_loglikelihoods(loaded, AutoTokenizer.from_pretrained(workspace["base"]))
    assert len(got) == len(ROWS)
    for row, want, base_row in zip(got, expected, base_run[1]):
        assert row == pytest.approx(want, abs=1e-5)
        assert all(abs(a - b) > 1e-3 for a, b in zip(row, base_row))
