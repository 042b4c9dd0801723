# %% [markdown]
# # Knowledge editing from Python, on the embedded SmolLM2-135M (CPU, a few minutes)
# An `Editor` holds the model, its tokenizer, the algorithm, its hparams and the edit state (C0, S_t, W_0).
# Edit three facts with EMMET, evaluate them with the CLI's metrics, look at what the model now says,
# restore the original weights; then three sequential batches with AlphaEdit and the retention of the first.

# %%
import sys
from pathlib import Path

REPO = Path.cwd() if (Path.cwd() / "algs").is_dir() else Path.cwd().parent  # run from the repo or examples/
sys.path.insert(0, str(REPO))

import json

import torch

from algs import Editor
from experiments.metrics import easyedit_records, evaluate, mean_scores
from experiments.metrics.answers import generation_success

torch.manual_seed(0)
CORPUS = REPO / "dsets" / "demo" / "wikitext2_test_excerpt.txt"  # C0 from a shipped WikiText excerpt: no download

# %% [markdown]
# ## 1. Load an Editor and edit three facts (EasyEdit's form: filled prompts, plain strings)

# %%
ed = Editor.from_pretrained("smollm2-135m", alg="EMMET", hparams="smollm2-135m.json", device="cpu")
ed.hparams.mom2_dataset = str(CORPUS)
facts = dict(
    prompts=["The mother tongue of Danielle Darrieux is", "The Eiffel Tower is located in the city of",
             "Toko Yasuda plays the instrument"],
    target_new=["English", "Rome", "piano"],
    subject=["Danielle Darrieux", "The Eiffel Tower", "Toko Yasuda"],
    ground_truth=["French", "Paris", "guitar"],
)
records = easyedit_records(**facts,
                           rephrase_prompts=["Danielle Darrieux grew up speaking", "The Eiffel Tower stands in",
                                             "Toko Yasuda is known for playing the"],
                           locality_inputs={"neighborhood": {
                               "prompt": ["The mother tongue of Albert Camus is", "The Colosseum is located in the city of",
                                          "Jimi Hendrix plays the instrument"],
                               "ground_truth": ["French", "Rome", "guitar"]}})
before = evaluate(ed.model, ed.tokenizer, records, generation=True)
report = ed.edit(**facts)
print(f"{len(ed.edits)} facts written in {report['batches'][0]['seconds']:.1f} s; ‖W_t − W_0‖ =",
      {name: round(norms["distance_from_initial"], 2) for name, norms in report["weight_norms"].items()})

# %% [markdown]
# ## 2. Evaluate them: teacher-forced (ES/PS) and generation-based (GES/GPS), locality

# %%
after = evaluate(ed.model, ed.tokenizer, records, generation=True, pre=before)
for name, cases in (("before", before), ("after", after)):
    means = mean_scores([case["scores"] for case in cases])
    print(name, json.dumps({key: round(100 * value, 1) for key, value in means.items()}))

# %% [markdown]
# ## 3. Look at one generation, then restore the unedited weights (bit for bit)

# %%
prompts, targets = ["The mother tongue of Danielle Darrieux is", "Danielle Darrieux grew up speaking"], ["English"] * 2
for prompt, answer in zip(prompts, generation_success(ed.model, ed.tokenizer, prompts, targets)):
    print(f"edited model: {prompt!r} -> {answer['answer']!r} (says English: {answer['success']})")
ed.restore()
for prompt, answer in zip(prompts, generation_success(ed.model, ed.tokenizer, prompts, targets)):
    print(f"restored:     {prompt!r} -> {answer['answer']!r} (says English: {answer['success']})")
assert ed.edits == [] and ed.state.prev_keys_cov == {}

# %% [markdown]
# ## 4. Sequential editing with AlphaEdit: three batches, and the retention of the first

# %%
counterfact = json.loads((REPO / "dsets" / "demo" / "counterfact_demo.json").read_text())[:6]
alpha = Editor(ed.model, ed.tokenizer, "AlphaEdit", "smollm2-135m.json")
alpha.hparams.mom2_dataset = str(CORPUS)
first = counterfact[:2]
for batch in range(3):
    alpha.edit(counterfact[2 * batch: 2 * batch + 2])
    retention = mean_scores([case["scores"] for case in evaluate(alpha.model, alpha.tokenizer, first)])
    print(f"after batch {batch}: {len(alpha.edits)} edits; first batch ES {100 * retention['ES']:.0f}%, "
          f"PS {100 * retention['PS']:.0f}%; S_t kept for {len(alpha.state.prev_keys_cov)} matrices")
alpha.restore()
