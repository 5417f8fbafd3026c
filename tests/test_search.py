"""HeadHunter (guidance.search) on tiny SD and DiT pipelines with cheap, deterministic objectives."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from guidance import CFG, SoftPAG, guide
from guidance.search import (
    HeadScore,
    as_batch,
    candidate_heads,
    classifier_confidence,
    clip_score,
    feature_distance,
    headhunter,
    prompt_kwargs,
    save_heads,
)
from tests.factories import clip_config, clip_tokenizer
from tests.test_pipeline import gen, get_pipe

STEPS = 2
SCALE = 3.0
MID = "mid_block.attentions.0.transformer_blocks.0.attn1"
DIT = "transformer_blocks.0.attn1"
CASES = {  # pipeline: prompts, candidates (None: all heads), the planted head
    "sd": (["a cat"], [("mid", 0), ("mid", 1), ("mid", 2)], (MID, 2)),
    "dit": (["class 1", "class 2"], None, (DIT, 1)),
}


def text_without_cfg(pipe, prompts):
    return {**prompt_kwargs(pipe, prompts), "guidance_scale": 1.0}


class Counting:
    """An objective that counts its calls."""

    def __init__(self, objective):
        self.objective, self.calls = objective, 0

    def __call__(self, images, prompts):
        self.calls += 1
        return self.objective(images, prompts)


def generate(pipe, prompts, *methods, call_kwargs=prompt_kwargs):
    """What HeadHunter generates: prompt i from seed i."""
    kwargs = {**call_kwargs(pipe, prompts), "num_inference_steps": STEPS, "output_type": "pt"}
    with guide(pipe, *methods):
        return pipe(**kwargs, generator=[gen(i) for i in range(len(prompts))]).images


def search(name, objective, **kwargs):
    prompts, candidates, _ = CASES[name]
    kwargs = {"candidates": candidates, "rounds": 2, "heads_per_round": 1, "progress": False} | kwargs
    if name == "sd":
        kwargs.setdefault("call_kwargs", text_without_cfg)
    return headhunter(get_pipe(name), prompts, objective, scale=SCALE, num_inference_steps=STEPS, **kwargs)


def planted(name):
    """An objective whose unique maximum (0) is the image made with SoftPAG on the planted head: minus the
    pixel distance to it."""
    prompts, _, head = CASES[name]
    call_kwargs = text_without_cfg if name == "sd" else prompt_kwargs
    target = generate(get_pipe(name), prompts, SoftPAG(SCALE, heads=[head], strength=1.0), call_kwargs=call_kwargs)
    return Counting(feature_distance(lambda x: x.flatten(1), (target * 2 - 1).flatten(1)))


@pytest.mark.parametrize("name", ["sd", "dit"])
def test_search_finds_the_planted_head_and_stops_when_nothing_improves(name):
    objective = planted(name)
    ranked = search(name, objective)
    assert ranked == [HeadScore(*CASES[name][2], pytest.approx(0.0, abs=1e-5), 0)]
    candidates = 3 if name == "sd" else 2
    # no SoftPAG, every candidate, every other candidate with the planted one; the chosen set is cached
    assert objective.calls == 1 + candidates + (candidates - 1)


def test_cache_file_resumes_an_interrupted_search_without_new_evaluations(tmp_path):
    path = tmp_path / "cache.jsonl"
    first = planted("dit")
    ranked = search("dit", first, cache=path)
    again = planted("dit")
    assert search("dit", again, cache=path) == ranked and again.calls == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + first.calls  # the settings, then one line per evaluated head set
    path.write_text("\n".join(lines[:3]) + '\n{"heads": [["transf')  # interrupted after two, mid-line
    resumed = planted("dit")
    assert search("dit", resumed, cache=path) == ranked and resumed.calls == first.calls - 2
    complete = planted("dit")
    assert search("dit", complete, cache=path) == ranked and complete.calls == 0
    fresh = planted("dit")
    assert search("dit", fresh, cache=path, resume=False) == ranked and fresh.calls == first.calls
    with pytest.raises(ValueError, match="other settings"):
        search("dit", planted("dit"), cache=path, seed=1)


def test_a_cache_of_other_call_arguments_or_another_scheduler_is_refused(tmp_path):
    import diffusers

    path = tmp_path / "cache.jsonl"
    search("sd", planted("sd"), cache=path)
    again = planted("sd")
    search("sd", again, cache=path)
    assert again.calls == 0
    with pytest.raises(ValueError, match="other settings"):  # another guidance scale in the call's arguments
        search("sd", planted("sd"), cache=path, call_kwargs=lambda pipe, p: {**text_without_cfg(pipe, p), "eta": 0.5})
    pipe = get_pipe("sd")
    original = pipe.scheduler
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(original.config)
    try:
        with pytest.raises(ValueError, match="other settings"):
            search("sd", planted("sd"), cache=path)
    finally:
        pipe.scheduler = original


def test_batch_size_changes_nothing():
    one, two = planted("dit"), planted("dit")
    ranked, batched = search("dit", one), search("dit", two, batch_size=2, progress=True)
    assert [(h.layer, h.head, h.round) for h in batched] == [(h.layer, h.head, h.round) for h in ranked]
    assert [h.score for h in batched] == pytest.approx([h.score for h in ranked], abs=1e-5)
    assert two.calls == one.calls


def test_several_heads_per_round_are_ranked_and_base_methods_apply():
    pipe = get_pipe("dit")
    prompts = CASES["dit"][0]
    plain = generate(pipe, prompts, CFG(2.0))
    away = Counting(lambda images, prompts: (images - plain).flatten(1).norm(dim=1))  # rewards any change
    ranked = search("dit", away, rounds=1, heads_per_round=2, base_methods=[CFG(2.0)])
    assert {(h.layer, h.head) for h in ranked} == {(DIT, 0), (DIT, 1)} and [h.round for h in ranked] == [0, 0]
    assert ranked[0].score >= ranked[1].score > 0
    assert away.calls == 3  # the baseline and each head; after the last round the set of both is not evaluated


def test_saved_heads_load_into_softpag(tmp_path):
    ranked = [HeadScore(MID, 2, 0.5, 0), HeadScore("down_blocks.1.attentions.0.transformer_blocks.0.attn1", 0, 0.4, 1)]
    path = tmp_path / "heads.json"
    save_heads(path, ranked)
    assert json.loads(path.read_text())["heads"][1] == {"layer": ranked[1].layer, "head": 0, "score": 0.4, "round": 1}
    method = SoftPAG.from_json(path, 2.0, top=1, strength=0.25)
    assert method == SoftPAG(2.0, heads=[(MID, 2)], strength=0.25)
    assert SoftPAG.from_json(path, 2.0).heads == ((MID, 2), (ranked[1].layer, 0))


def test_default_candidates_are_every_head_of_every_self_attention_layer():
    heads = candidate_heads(get_pipe("sd"))
    assert len(heads) == 4 * 4 and (MID, 3) in heads
    assert candidate_heads(get_pipe("dit")) == [(DIT, 0), (DIT, 1)]
    assert candidate_heads(get_pipe("sd"), [("mid", 1), (MID, 1), (-1, 0)]) == [(MID, 0), (MID, 1)]


def test_bad_inputs_are_clear_errors():
    pipe = get_pipe("dit")
    ok = lambda images, prompts: torch.zeros(len(prompts))
    with pytest.raises(ValueError, match="non-empty list"):
        headhunter(pipe, [], ok)
    with pytest.raises(ValueError, match="not one str"):
        headhunter(pipe, "class 1", ok)
    with pytest.raises(ValueError, match="at least one candidate"):
        headhunter(pipe, ["class 1"], ok, candidates=[])
    for bad in ({"rounds": 0}, {"heads_per_round": 0}, {"heads_per_round": 1.5}, {"num_inference_steps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            headhunter(pipe, ["class 1"], ok, **bad)
    with pytest.raises(ValueError, match="head 5 is out of range"):
        headhunter(pipe, ["class 1"], ok, candidates=[(DIT, 5)])
    with pytest.raises(ValueError, match="no self-attention layer matches 'nope'"):
        headhunter(pipe, ["class 1"], ok, candidates=[("nope", 0)])
    with pytest.raises(ValueError, match="strength"):
        headhunter(pipe, ["class 1"], ok, strength=2.0)
    with pytest.raises(TypeError, match="callable"):
        headhunter(pipe, ["class 1"], "clip")
    with pytest.raises(ValueError, match=r"one score per image, shape \(1,\)"):
        headhunter(pipe, ["class 1"], lambda images, prompts: torch.zeros(2), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"must not set \['generator'\]"):
        headhunter(pipe, ["class 1"], ok, call_kwargs=lambda pipe, prompts: {"generator": None}, progress=False)


# --------------------------------------------------------------------------- objectives


def test_classifier_confidence_is_the_probability_of_each_prompts_class():
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    images = torch.randint(0, 256, (2, 3, 8, 8)) / 255
    objective = classifier_confidence(classifier, ["circle", "square", "star"])
    scores = objective(images, ["star", "circle"])
    probabilities = classifier(images * 2 - 1).softmax(-1)
    torch.testing.assert_close(scores, probabilities[[0, 1], [2, 0]])
    pil = [Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()) for x in images]
    torch.testing.assert_close(objective(pil, ["star", "circle"]), scores)
    with pytest.raises(ValueError, match="none of the class names"):
        objective(images, ["star", "cat"])


def test_feature_distance_is_zero_at_the_target_only():
    images = torch.rand(2, 3, 4, 4, generator=gen())
    one_target = feature_distance(lambda x: x.mean(dim=(2, 3)), (images[0] * 2 - 1).mean(dim=(1, 2)))
    scores = one_target(images, ["a", "b"])
    assert scores.shape == (2,) and scores[0].abs() < 1e-6 and scores[1] < -1e-3
    per_prompt = feature_distance(lambda x: x.flatten(1), (as_batch(images) * 2 - 1).flatten(1))
    torch.testing.assert_close(per_prompt(images, ["a", "b"]), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(D,\) or \(N, D\)"):
        feature_distance(lambda x: x, images)


def test_clip_score_loads_by_path_and_is_the_scaled_cosine(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config=clip_config().to_dict(),
        vision_config={**vision, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    crop = {"height": 32, "width": 32}
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop), clip_tokenizer())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    images, prompts = torch.rand(2, 3, 32, 32, generator=gen()), ["a cat", "a dog on a hill"]
    scores = clip_score(model, processor)(images, prompts)
    torch.testing.assert_close(clip_score(str(tmp_path))(images, prompts), scores)
    pixels = [Image.fromarray(a) for a in (images * 255).round().byte().permute(0, 2, 3, 1).numpy()]
    with torch.no_grad():
        output = model(**processor(text=prompts, images=pixels, return_tensors="pt", padding=True))
    torch.testing.assert_close(scores, 100 * output.logits_per_image.diagonal() / model.logit_scale.exp())
    with pytest.raises(ValueError, match="processor"):
        clip_score(model)
