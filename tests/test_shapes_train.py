"""shapes-llava's training rows: the first question is laid out exactly as at inference, and
the attention and probe targets sit at the position that predicts each answer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    from mllm_deploy.scenes import shapes_vqa
    from mllm_deploy.models.shapes_llava import write_untrained
    from mllm_deploy.tools.shapes_train import make_conversation_batch, prompt_builder
    from mllm_deploy.formats.image import ImagePreprocessConfig

    model_dir = write_untrained(tmp_path_factory.mktemp("shapes") / "init")
    builder = prompt_builder(model_dir)
    scenes = [shapes_vqa.scene("train", i, drill=1) for i in range(3)]
    out = make_conversation_batch(scenes, builder, ImagePreprocessConfig.from_model_dir(model_dir), 2, 3)
    return builder, scenes, out


def test_first_question_is_the_inference_prompt(batch):
    builder, scenes, (ids, mask, target, _weight, pixels, _sites) = batch
    assert pixels.shape[0] == len(scenes)
    for b, scene in enumerate(scenes):
        prompt = builder.encode(builder.render_chat(scene.qas[0][0]))[0].tolist()
        assert ids[b, :len(prompt)].tolist() == prompt
        answer = builder.tokenizer.token_to_id(scene.qas[0][1])
        assert target[b, len(prompt)].item() == answer  # the token right after the prompt is supervised
        assert (target[b, :len(prompt)] == -100).all()


def test_answer_sites_sit_before_each_answer(batch):
    builder, scenes, (ids, mask, target, _weight, _pixels, sites) = batch
    assert [(b, roles.tolist()) for b, _pos, roles, _q, _r in sites] == [
        (b, roles.tolist()) for b, scene in enumerate(scenes) for roles in scene.relevance]
    answers = {builder.tokenizer.token_to_id(w) for w in ("yes", "no", "zero", "one", "two", "three", "red",
                                                          "green", "blue", "yellow", "purple", "orange",
                                                          "circle", "square", "triangle")}
    for b, pos, *_ in sites:
        assert builder.tokenizer.id_to_token(int(ids[b, pos])) == ":"
        assert int(target[b, pos + 1]) in answers


def test_probe_targets_name_what_the_question_and_scene_say():
    from mllm_deploy.scenes.shapes_vqa import SceneObject
    from mllm_deploy.tools.shapes_train import IGNORE, query_targets, readout_targets

    # kind, colour, shape, colour2, shape2, row, column; the last class of a slot means "not named"
    assert query_targets("is the red circle left of the blue square ?", "left_of") == [2, 0, 0, 2, 1, 4, 4]
    assert query_targets("which colour does the shape at row two , column four have ?", "colour_at") == [
        0, 6, 3, 6, 3, 1, 3]
    assert query_targets("how many triangles can you see ?", "count") == [1, 6, 2, 6, 3, 4, 4]
    a = SceneObject("square", "green", True, 2, 1, 0, 0)
    b = SceneObject("circle", "orange", False, 0, 3, 0, 0)
    assert readout_targets([(a, 1), (b, 2)]) == [1, 1, 2, 1, 0, 3]
    assert readout_targets([(a, 1), (b, 1)]) == [IGNORE] * 6  # a count names several: no single object
    assert readout_targets([]) == [IGNORE] * 6


def test_look_loss_uses_the_attention_the_model_computes(batch, tmp_path):
    """The recomputed scores at the answer positions are the eager attention's own probabilities,
    and the loss is -log of their mass on the named patches."""
    from transformers import LlavaForConditionalGeneration

    from mllm_deploy.models.shapes_llava import write_untrained
    from mllm_deploy.tools.shapes_train import answer_attention_logits, look_loss

    builder, scenes, (ids, mask, target, _weight, pixels, sites) = batch
    model = LlavaForConditionalGeneration.from_pretrained(write_untrained(tmp_path / "m", seed=1),
                                                          attn_implementation="eager").eval()
    captured = {}
    attn = model.model.language_model.layers[2].self_attn
    attn.register_forward_pre_hook(lambda _m, _a, kw: captured.update(h=kw["hidden_states"],
                                                                       rope=kw["position_embeddings"]),
                                   with_kwargs=True)
    looks = [site for site in sites if site[2].any()]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True)
        scores = answer_attention_logits(attn, captured["h"], captured["rope"], looks)
    probs = torch.softmax(scores, -1)
    reference = torch.stack([out.attentions[2][b, :2, pos] for b, pos, *_ in looks])
    torch.testing.assert_close(probs, reference, rtol=1e-4, atol=1e-6)

    image = (ids[0] == model.config.image_token_id).nonzero().squeeze(-1)
    expected = []
    for i, (b, _pos, roles, _q, _r) in enumerate(looks):
        positions = (ids[b] == model.config.image_token_id).nonzero().squeeze(-1)
        for head, role in ((0, 1), (1, 2)):
            if (roles == role).any():
                expected.append(-torch.log(probs[i, head, positions[torch.from_numpy(roles == role)]].sum()))
    assert len(image) == 256
    got = look_loss(scores, ids, model.config.image_token_id, looks)
    assert got.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)


def test_each_segment_computes_what_its_inference_prompt_computes(tmp_path):
    """Segments share the image prefix but see nothing of each other: the logits at every answer
    position equal those of the question asked alone, the way run-mllm asks it."""
    from transformers import LlavaForConditionalGeneration

    from mllm_deploy.scenes import shapes_vqa
    from mllm_deploy.models.shapes_llava import write_untrained
    from mllm_deploy.tools.shapes_train import make_batch, make_segment_batch, prompt_builder
    from mllm_deploy.formats.image import ImagePreprocessConfig

    model_dir = write_untrained(tmp_path / "m", seed=2)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    builder = prompt_builder(model_dir)
    config = ImagePreprocessConfig.from_model_dir(model_dir)
    scenes = [shapes_vqa.scene("validation", i) for i in range(2)]
    ids, mask, positions, target, _w, pixels, sites = make_segment_batch(scenes, builder, config, 2, 3)
    assert len(sites) == sum(len(s.qas) for s in scenes)
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixels).logits
        turn = 0
        for i, (b, pos, *_rest) in enumerate(sites):
            turn = 0 if i == 0 or sites[i - 1][0] != b else turn + 1
            question, answer, kind = scenes[b].qas[turn]
            alone = make_batch([shapes_vqa.Example(scenes[b].image, question, answer, kind, 0)], builder, config, 2, 3)
            single = model(input_ids=alone[0], attention_mask=alone[1], pixel_values=alone[3]).logits
            prompt_end = int((alone[2][0] != -100).nonzero()[0]) - 1
            torch.testing.assert_close(packed[b, pos], single[0, prompt_end], rtol=1e-4, atol=1e-5)
            assert int(target[b, pos + 1]) == builder.tokenizer.token_to_id(answer)
