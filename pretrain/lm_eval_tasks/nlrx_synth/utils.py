"""lm-evaluation-harness task `nlrx_synth`: pretrain.evaluate's exact match, run by the harness.

Same pairs, prompt, budget, stop and comparison as `python -m pretrain.evaluate MODEL_DIR
data/nlrx_synth/test.jsonl` (its `exact_match` and `prefix_match`, in %):
    pairs    views 0 → 1 of the chat records (description → regex), read by pretrain.evaluate
    prompt   "<bos>A<|view_sep|>"; load_pairs checks that the harness's tokenizer encodes it to
             exactly [bos] A [view_sep] (see prepare.py: the exported tokenizer cannot)
    budget   the reference's length in tokens + 8 new tokens, per pair (NlrxSynthTask)
    stop     at eos (the model's generation_config and the harness's "</s>" stop string)
    compare  generation and reference stripped of surrounding whitespace, then equal

    decode   view_sep and predictor tokens generated before eos stay in the text (prepare.py)

Two differences remain, about generations a trained model does not make: the harness drops a
bos, pad or unk generated before eos (transformers keeps those special, and the harness decodes
with skip_special_tokens), where pretrain.evaluate keeps their text and so counts a miss; and it
also stops at the *text* "</s>" spelled in ordinary pieces.

The model arguments reach load_pairs as task metadata (`pretrained`, `tokenizer`); another file
of chat records can be scored with --metadata '{"data": "PATH"}'.
"""

from __future__ import annotations

from pathlib import Path

import datasets
from lm_eval.api.task import ConfigurableTask

from data_pipeline.tokenizer import VIEW_SEP, special_token_ids
from pretrain.evaluate import read_pairs

DATA = Path(__file__).resolve().parents[3] / "data" / "nlrx_synth" / "test.jsonl"
# pretrain.evaluate.generate: max_new_tokens = len(reference tokens) + 8 when not given
BUDGET_SLACK_TOKENS = 8


def load_pairs(tokenizer=None, pretrained=None, data: str = str(DATA), **_) -> datasets.DatasetDict:
    """The test split: prompt, reference and token budget of every pair, in file order. Pairs
    and budgets come from the model's own tokenizer (`pretrained`), as in pretrain.evaluate;
    the harness's (`tokenizer`) must encode each prompt to [bos] A [view_sep] of those ids."""
    from transformers import AutoTokenizer

    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError("nlrx_synth needs a local model folder: --model_args pretrained=DIR,...")
    own = AutoTokenizer.from_pretrained(pretrained, local_files_only=True)
    harness = AutoTokenizer.from_pretrained(tokenizer or pretrained, local_files_only=True)
    sp = special_token_ids(own)
    pairs = read_pairs(data, own)
    prompts = [f"{harness.bos_token}{a}{VIEW_SEP}" for a in pairs.a_text]
    # A prompt that starts with the bos text is encoded without adding specials (HFLM).
    got = harness(prompts, add_special_tokens=False)["input_ids"]
    for i, (ids, a) in enumerate(zip(got, pairs.a)):
        want = [sp["bos"], *a, sp["view_sep"]]
        if ids != want:
            raise ValueError(
                f"{tokenizer or pretrained}: the prompt of pair {i} ({pairs.a_text[i][:60]!r})"
                f" encodes to {ids[:10]}…, not [bos] A [view_sep] = {want[:10]}…; give the harness"
                " the tokenizer copy that pretrain.export writes (for older exports:"
                " `python -m pretrain.lm_eval_tasks.prepare MODEL_DIR`):"
                " --model_args pretrained=MODEL_DIR,tokenizer=MODEL_DIR/lm_eval_tokenizer"
            )
    test = datasets.Dataset.from_dict({
        "prompt": prompts,
        "reference": pairs.b_text,
        "max_gen_toks": [len(b) + BUDGET_SLACK_TOKENS for b in pairs.b],
    })  # fmt: skip
    return datasets.DatasetDict({"test": test})


class NlrxSynthTask(ConfigurableTask):
    """The YAML's task with a generation budget per pair (the YAML's is one for all)."""

    def __init__(self, config=None):
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"})

    def construct_requests(self, doc, ctx, **kwargs):
        request = super().construct_requests(doc, ctx, **kwargs)
        request.arguments[1]["max_gen_toks"] = doc["max_gen_toks"]
        return request


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """pretrain.evaluate's scores of one pair, in %."""
    generated, reference = results[0].strip(), doc["reference"].strip()
    return {
        "exact_match": 100.0 * (generated == reference),
        "prefix_match": 100.0 * generated.startswith(reference),
    }
