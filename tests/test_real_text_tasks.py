"""The real-text task ui_strings_fr on a small corpus in its cache (the real one needs the pinned packages): what a
batch holds, and that a model trains on it."""

import json

import pytest
import torch

from benchmarks import optimizers, runner
from benchmarks.tasks import TASKS, ui_strings_fr

PAIRS = [("Save changes", "Enregistrer les modifications"), ("Delete this page?", "Supprimer cette page ?"),
         ("Search the site", "Rechercher dans le site"), ("Your password was changed.", "Votre mot de passe a été modifié."),
         ("Close", "Fermer"), ("Add a new group", "Ajouter un nouveau groupe")]


def test_a_batch_is_the_english_source_and_the_french_labels(tmp_path, monkeypatch):
    for split, pairs in (("train", PAIRS * 6), ("validation", PAIRS[:3])):  # one batch of 32 and more
        (tmp_path / f"{split}.json").write_text("".join(json.dumps({"translation": {"en": en, "fr": fr}}) + "\n"
                                                        for en, fr in pairs), encoding="utf-8")
    (tmp_path / "manifest.json").write_text("{}")
    monkeypatch.setattr(ui_strings_fr, "CACHE", tmp_path)
    data = TASKS["ui_strings_fr"].load(quick=True)
    tokenizer = ui_strings_fr.tokenizer_for([{"en": en, "fr": fr} for en, fr in PAIRS * 6])
    assert data.size == 36 and sum(len(b["labels"]) for b in data.val_batches) == 3
    batch = data.batch(torch.tensor([0, 4]))  # "Save changes" and "Close": trimmed to the longer of the two
    labels = batch["labels"]
    assert tokenizer.decode(labels[0][labels[0] != -100], skip_special_tokens=True) == "Enregistrer les modifications"
    assert tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1] == 1], skip_special_tokens=True) == "Close"
    assert (labels[1] == -100).any() and not (labels[0] == -100).any()  # the shorter label is padded, the longer not
    assert int(labels[1][labels[1] != -100][-1]) == tokenizer.eos_token_id
    result = runner.train_in_process(TASKS["ui_strings_fr"], data, optimizers.resolve({"kind": "adamw"}), 3e-3, 0, 8, 8)
    assert result["losses"][-1] < result["losses"][0]
    # greedy translations of the validation sources scored against their references: a model that copies a reference
    # scores 100, one that emits nothing 0
    model = data.build_model(0)
    assert set(result["metrics"]) == {"bleu", "chrf"} and 0 <= result["metrics"]["bleu"] <= 100
    references = [fr for _, fr in PAIRS[:3]]

    def fake_generate(input_ids, attention_mask, **kwargs):
        assert attention_mask[:, -1].any()  # padding columns no row uses were cut
        return tokenizer(references[:len(input_ids)], padding=True, return_tensors="pt")["input_ids"]

    model.generate = fake_generate
    assert data.final_metrics(model) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    model.generate = lambda input_ids, attention_mask, **kwargs: torch.full((len(input_ids), 1), tokenizer.eos_token_id)
    assert data.final_metrics(model) == {"bleu": 0.0, "chrf": 0.0}
