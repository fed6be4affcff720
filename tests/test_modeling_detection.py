"""DenseCLIP's RetinaNet and Mask R-CNN (and their CLIP baselines) against the authors' code: the fixtures
`fixtures/official_denseclip_det_{retinanet,maskrcnn,clip_retinanet,clip_maskrcnn}.*` hold the authors' detectors
(mmdet 2.28.2 / mmcv 1.7.2, CPU) run on tiny random-weight models: every parameter under its original key, two test
images with their metas, every intermediate tensor and the final detections and masks. The models here are built from
those parameters (`convert_authors_detection_state_dict`) and run on the stored inputs."""

import pytest
import torch
from detection_fixtures import (
    DETECTORS,
    FIXTURE_SIZE,
    IMAGES,
    authors_state_dict,
    detector,
    fixture,
    is_retinanet,
    load_detector,
    metas,
    rgb_image,
    run,
    tiny_config,
)

from denseclip_hf import DenseClipDetectionImageProcessor, DenseClipMaskRCNNConfig, DenseClipRetinaNetConfig
from denseclip_hf.convert_denseclip_original_to_hf import convert_authors_detection_state_dict
from denseclip_hf.modeling_clip_resnet import resize_position_embedding
from denseclip_hf.modeling_denseclip import visual_context
from denseclip_hf.modeling_denseclip_detection import (
    DenseClipInstanceSegmentationOutput,
    ImageFrame,
    dense_detections,
    rcnn_detections,
    rpn_proposals,
)

# Every intermediate to 1e-5 of its largest value (reached: 5e-6; the fixtures' machine rounds differently, e.g. the
# convolutions already differ by 1e-7). Boxes to 1e-4 px + 2e-6 of the coordinate (reached: 1.2e-4 at 104 px): the
# box deltas' 1e-6 differences times the anchors' sizes.
RELATIVE = 1e-5
BOX_TOLERANCE = dict(rtol=2e-6, atol=1e-4)


def expected(name: str, image: int, key: str) -> torch.Tensor:
    return fixture(name)[0][f"expected.img{image}.{key}"]


def assert_relative(actual: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """Same shape, and every value within `RELATIVE` of the reference's largest magnitude."""
    assert actual.shape == reference.shape, f"{what}: {tuple(actual.shape)} != {tuple(reference.shape)}"
    scale = reference.abs().max().clamp(min=1e-12)
    error = ((actual.float() - reference).abs().max() / scale).item()
    assert error <= RELATIVE, f"{what}: relative difference {error:.2e}"


def assert_detections(boxes, scores, labels, reference: torch.Tensor, reference_labels: torch.Tensor) -> None:
    """The same detections in the same order: labels equal, scores and boxes to float rounding."""
    assert torch.equal(labels, reference_labels)
    torch.testing.assert_close(scores, reference[:, 4], rtol=RELATIVE, atol=0)
    torch.testing.assert_close(boxes, reference[:, :4], **BOX_TOLERANCE)


def class_major(labels: torch.Tensor) -> torch.Tensor:
    """The authors' `bbox2result` order: a stable partition by class (class 0 first)."""
    return torch.sort(labels, stable=True).indices


# ---------------------------------------------------------------------------------------------------------------------
# Configuration and weights
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_defaults_are_the_authors(name):
    """Every default against the fixture's `model_cfg` / `test_cfg` / `train_cfg` (the authors' configs; only sizes
    were changed for the fixtures)."""
    _, meta = fixture(name)
    model_cfg, test_cfg, train_cfg = meta["model_cfg"], meta["test_cfg"], meta["train_cfg"]
    if name == "retinanet":
        config = DenseClipRetinaNetConfig()
        head = model_cfg["bbox_head"]
        anchors = head["anchor_generator"]
        assert (config.anchor_octave_base_scale, config.anchor_scales_per_octave) == (
            anchors["octave_base_scale"],
            anchors["scales_per_octave"],
        )
        assert (config.anchor_strides, config.anchor_ratios) == (anchors["strides"], anchors["ratios"])
        assert config.head_stacked_convs == head["stacked_convs"]
        assert (config.nms_pre, config.score_threshold) == (test_cfg["nms_pre"], test_cfg["score_thr"])
        assert config.nms_iou_threshold == test_cfg["nms"]["iou_threshold"]
        assert config.max_detections == test_cfg["max_per_img"]
        assigner = train_cfg["assigner"]
        assert (
            config.assigner_pos_iou_threshold,
            config.assigner_neg_iou_threshold,
            config.assigner_min_pos_iou,
        ) == (assigner["pos_iou_thr"], assigner["neg_iou_thr"], assigner["min_pos_iou"])
        assert (config.focal_loss_alpha, config.focal_loss_gamma) == (
            head["loss_cls"]["alpha"],
            head["loss_cls"]["gamma"],
        )
        assert config.fpn_levels == (model_cfg["neck"]["start_level"], 2)
    else:
        config = DenseClipMaskRCNNConfig()
        anchors = model_cfg["rpn_head"]["anchor_generator"]
        assert (config.rpn_anchor_strides, config.rpn_anchor_scales, config.anchor_ratios) == (
            anchors["strides"],
            anchors["scales"],
            anchors["ratios"],
        )
        rpn, rcnn = test_cfg["rpn"], test_cfg["rcnn"]
        assert (config.rpn_nms_pre, config.rpn_max_proposals, config.rpn_min_box_size) == (
            rpn["nms_pre"],
            rpn["max_per_img"],
            rpn["min_bbox_size"],
        )
        assert config.rpn_nms_iou_threshold == rpn["nms"]["iou_threshold"]
        assert (config.score_threshold, config.max_detections, config.mask_threshold) == (
            rcnn["score_thr"],
            rcnn["max_per_img"],
            rcnn["mask_thr_binary"],
        )
        assert config.nms_iou_threshold == rcnn["nms"]["iou_threshold"]
        roi_head = model_cfg["roi_head"]
        assert config.box_roi_size == roi_head["bbox_roi_extractor"]["roi_layer"]["output_size"]
        assert config.mask_roi_size == roi_head["mask_roi_extractor"]["roi_layer"]["output_size"]
        assert config.roi_sampling_ratio == roi_head["bbox_roi_extractor"]["roi_layer"]["sampling_ratio"]
        assert config.roi_strides == roi_head["bbox_roi_extractor"]["featmap_strides"]
        assert config.box_coder_stds == roi_head["bbox_head"]["bbox_coder"]["target_stds"]
        assert config.mask_head_convs == roi_head["mask_head"]["num_convs"]
        assert config.rpn_train_nms_pre == train_cfg["rpn_proposal"]["nms_pre"]
        for stage in ("rpn", "rcnn"):
            assigner, sampler = train_cfg[stage]["assigner"], train_cfg[stage]["sampler"]
            assert [
                getattr(config, f"{stage}_assigner_{key}") for key in ("pos_iou_threshold", "neg_iou_threshold")
            ] == [
                assigner["pos_iou_thr"],
                assigner["neg_iou_thr"],
            ]
            assert getattr(config, f"{stage}_assigner_min_pos_iou") == assigner["min_pos_iou"]
            assert getattr(config, f"{stage}_sampler_num") == sampler["num"]
            assert getattr(config, f"{stage}_sampler_pos_fraction") == sampler["pos_fraction"]
        assert config.rcnn_sampler_add_gt_as_proposals == train_cfg["rcnn"]["sampler"]["add_gt_as_proposals"]
        assert config.mask_size == train_cfg["rcnn"]["mask_size"]
        assert config.fpn_levels == (0, 1)
    # The DenseCLIP parts of both: RN50 with the 42 x 42 cropped grid, 5-token names after 8 contexts, s / tau.
    assert config.vision_config.layers == [3, 4, 6, 3] and config.vision_config.image_size == 1344
    assert config.position_embedding_interpolation == "crop" and config.join_score_map_over_temperature
    assert (config.projection_dim, config.temperature) == (1024, 0.07)
    assert (config.num_context_tokens, config.class_name_token_length) == (8, model_cfg["context_length"])
    assert (config.context_decoder_layers, config.context_decoder_hidden_size, config.context_decoder_heads) == (
        3,
        256,
        4,
    )
    assert config.fpn_channels == 256


@pytest.mark.parametrize(
    ("config_class", "settings", "message"),
    [
        (DenseClipRetinaNetConfig, dict(vision_config={"model_type": "clip_vision_model"}), "must be a CLIP ResNet"),
        (DenseClipRetinaNetConfig, dict(anchor_strides=[8, 16, 24]), "`anchor_strides`.*must double"),
        (DenseClipRetinaNetConfig, dict(anchor_strides=[2, 4]), "`anchor_strides`.*must double"),
        (DenseClipRetinaNetConfig, dict(score_threshold=1.5), r"`score_threshold`.*in \[0, 1\]"),
        (DenseClipRetinaNetConfig, dict(anchor_ratios=[]), "`anchor_ratios`"),
        (DenseClipRetinaNetConfig, dict(nms_pre=0), "`nms_pre`"),
        (DenseClipMaskRCNNConfig, dict(rpn_anchor_scales=[0]), "`rpn_anchor_scales`"),
        (DenseClipMaskRCNNConfig, dict(box_coder_stds=[0.1, 0.2]), "`box_coder_stds`"),
        (DenseClipMaskRCNNConfig, dict(mask_threshold=-0.1), "`mask_threshold`"),
        (DenseClipMaskRCNNConfig, dict(position_embedding_interpolation="nearest"), "position_embedding_interp"),
    ],
)
def test_bad_settings_are_value_errors_naming_them(config_class, settings, message):
    with pytest.raises(ValueError, match=message):
        config_class(**settings)


@pytest.mark.parametrize("name", DETECTORS)
def test_config_round_trip(name, tmp_path):
    config = tiny_config(name)
    config.save_pretrained(tmp_path)
    loaded = type(config).from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_class_names_tokenize_as_the_authors():
    assert tiny_config("retinanet").class_token_ids == fixture("retinanet")[0]["inputs.class_token_ids"].tolist()


@pytest.mark.parametrize("name", DETECTORS)
def test_every_authors_tensor_has_a_place(name):
    """Every authors' tensor maps (packed q/k/v split in three), every model tensor is filled, and the model holds them
    unchanged (`detector` loads with `strict=True`)."""
    model = detector(name)
    converted = convert_authors_detection_state_dict(authors_state_dict(name), model)
    assert converted.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, converted[key]), key


# ---------------------------------------------------------------------------------------------------------------------
# Exactness: every intermediate, the detections, the masks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("name", DETECTORS)
def test_image_and_text_features_match_the_authors(name, image):
    model, outputs = detector(name), run(name, image)
    for level in range(4):  # C2-C5, before the score map is joined
        assert_relative(outputs.hidden_states[level + 1], expected(name, image, f"backbone_features.{level}"), "C")
    if name.startswith("clip_"):
        assert outputs.score_map is None and outputs.text_embeddings is None
        return
    with torch.no_grad():
        encoded = model.denseclip.image_encoder(metas(name, image)["pixel_values"])
        text = model.get_text_embeddings()
        decoded = model.denseclip.prompting.context_decoder(text[None], visual_context(encoded))
    assert_relative(encoded.global_embedding, expected(name, image, "global_embedding"), "global embedding")
    assert_relative(encoded.dense_embedding, expected(name, image, "dense_embedding"), "dense embedding")
    assert_relative(text[None], fixture(name)[0]["expected.text_embeddings_pre"], "text embeddings (pre)")
    assert_relative(decoded, expected(name, image, "context_decoder_out"), "context decoder")
    assert_relative(outputs.text_embeddings, expected(name, image, "text_embeddings"), "text embeddings")
    # The score map joined to C5 is cos / tau; the output is the cosine.
    assert_relative(outputs.score_map / model.config.temperature, expected(name, image, "score_map"), "score map")


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("name", DETECTORS)
def test_fpn_and_head_outputs_match_the_authors(name, image):
    outputs = run(name, image)
    assert len(outputs.feature_maps) == 5
    for level, feature in enumerate(outputs.feature_maps):
        assert_relative(feature, expected(name, image, f"neck_outputs.{level}"), f"FPN level {level}")
    if is_retinanet(name):
        for level in range(5):
            assert_relative(outputs.class_logits[level], expected(name, image, f"cls_scores.{level}"), "class logits")
            assert_relative(outputs.box_deltas[level], expected(name, image, f"bbox_preds.{level}"), "box deltas")
        return
    for level in range(5):
        assert_relative(outputs.rpn_objectness[level], expected(name, image, f"rpn_cls_scores.{level}"), "objectness")
        assert_relative(outputs.rpn_box_deltas[level], expected(name, image, f"rpn_bbox_preds.{level}"), "RPN deltas")
    proposals = expected(name, image, "rpn_proposals")
    assert_detections(
        outputs.proposals[0][:, :4],
        outputs.proposals[0][:, 4],
        torch.zeros(len(proposals)),
        proposals,
        torch.zeros(len(proposals)),
    )
    assert_relative(outputs.roi_class_logits[0], expected(name, image, "roi_cls_score"), "RoI class logits")
    assert_relative(outputs.roi_box_deltas[0], expected(name, image, "roi_bbox_pred"), "RoI box deltas")


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("name", DETECTORS)
def test_detections_match_the_authors(name, image):
    outputs = run(name, image)
    raw, raw_labels = expected(name, image, "det_bboxes_raw"), expected(name, image, "det_labels_raw")
    assert len(raw) > 0
    assert_detections(outputs.pred_boxes[0], outputs.scores[0], outputs.labels[0], raw, raw_labels)
    assert outputs.frame_sizes.tolist() == [fixture(name)[0][f"meta.img{image}.ori_shape"][:2].tolist()]
    # With threshold 0 the post-processing returns exactly these: as the authors' class-major lists, per class.
    result = DenseClipDetectionImageProcessor().post_process_object_detection(outputs, threshold=0.0)[0]
    order = class_major(result["labels"])
    final = expected(name, image, "det_bboxes")
    assert torch.equal(result["labels"][order], expected(name, image, "det_labels"))
    torch.testing.assert_close(result["scores"][order], final[:, 4], rtol=RELATIVE, atol=0)
    torch.testing.assert_close(result["boxes"][order], final[:, :4], **BOX_TOLERANCE)


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("name", ["retinanet", "clip_retinanet"])
def test_dense_case_matches_the_authors(name, image):
    """The fixtures' extra case (score threshold 0.01): the per-level cut to 1000 (anchor, class) pairs and the cut
    to 100 detections, from the model's head outputs."""
    model, outputs = detector(name), run(name, image)
    logits = [level[0] for level in outputs.class_logits]
    pairs = [int((level.sigmoid() > 0.01).sum()) for level in logits]
    assert pairs == expected(name, image, "dense.num_pairs_above_thr").tolist()
    assert max(pairs) > model.config.nms_pre
    anchors = model.anchor_generator.grid_anchors([level.shape[-2:] for level in logits])
    frame = ImageFrame(
        tuple(metas(name, image)["image_sizes"][0].tolist()), metas(name, image)["scale_factors"][0], (0, 0)
    )
    boxes, scores, labels = dense_detections(
        logits,
        [level[0] for level in outputs.box_deltas],
        anchors,
        frame,
        score_threshold=0.01,
        nms_pre=model.config.nms_pre,
        iou_threshold=model.config.nms_iou_threshold,
        max_detections=model.config.max_detections,
    )
    raw = expected(name, image, "dense.det_bboxes_raw")
    assert len(raw) == model.config.max_detections
    assert_detections(boxes, scores, labels, raw, expected(name, image, "dense.det_labels_raw"))


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("name", ["maskrcnn", "clip_maskrcnn"])
def test_masks_match_the_authors_pixel_for_pixel(name, image):
    model, outputs = detector(name), run(name, image)
    probabilities = outputs.pred_masks[0]
    assert probabilities.shape == (len(outputs.labels[0]), 28, 28)
    assert_relative(probabilities, expected(name, image, "mask_logits_label").sigmoid(), "mask probabilities")
    # Every class's logits of the first 4 detections: the mask head on the mask RoIs (boxes x scale factor).
    rois = outputs.pred_boxes[0][:4] * metas(name, image)["scale_factors"][0]
    with torch.no_grad():
        logits = model.mask_head(model.roi_features(outputs.feature_maps, [rois], model.config.mask_roi_size))
    assert_relative(logits, expected(name, image, "mask_logits_first"), "mask logits")
    result = DenseClipDetectionImageProcessor().post_process_instance_segmentation(
        outputs, threshold=0.0, return_binary_maps=True
    )[0]
    order = class_major(torch.tensor([segment["label_id"] for segment in result["segments_info"]]))
    masks = expected(name, image, "det_masks").bool()
    assert masks.any() and result["segmentation"].dtype == torch.bool
    assert torch.equal(result["segmentation"][order], masks)
    assert [segment["id"] for segment in result["segments_info"]] == list(range(len(masks)))


@pytest.mark.parametrize("name", DETECTORS)
def test_processor_and_model_from_the_stored_images(name):
    """From the stored BGR images: the processor gives the authors' input bit for bit, so the model the same
    detections as from the stored input."""
    processor = DenseClipDetectionImageProcessor(size=FIXTURE_SIZE)
    for image in IMAGES:
        inputs = processor(rgb_image(name, image), return_tensors="pt")
        for key, value in metas(name, image).items():
            assert torch.equal(inputs[key], value.to(inputs[key].dtype)), key
        with torch.no_grad():
            outputs = detector(name)(**inputs)
        reference = run(name, image)
        for field in ("pred_boxes", "scores", "labels"):
            assert torch.equal(getattr(outputs, field)[0], getattr(reference, field)[0])


# ---------------------------------------------------------------------------------------------------------------------
# What DenseCLIP detection changes in the shared model
# ---------------------------------------------------------------------------------------------------------------------


def test_crop_takes_the_top_left_of_the_positional_grid():
    table = torch.randn(1 + 4 * 4, 3)
    cropped = resize_position_embedding(table, (2, 3), "crop")
    grid = table[1:].reshape(4, 4, 3)
    expected_rows = [table[0]] + [grid[row, column] for row in range(2) for column in range(3)]
    assert torch.equal(cropped, torch.stack(expected_rows))
    with pytest.raises(ValueError, match="4x4 grid.*map is 5x1"):
        resize_position_embedding(table, (5, 1), "crop")


def test_inputs_larger_than_the_cropped_grid_are_a_clear_error():
    model = detector("retinanet")  # a 10 x 10 grid: inputs up to 320 pixels per side
    with pytest.raises(ValueError, match="10x10 grid.*map is 11x1"):
        model(torch.zeros(1, 3, 352, 32))


def test_the_segmentation_model_keeps_the_cosine_and_resizing():
    from denseclip_hf import DenseClipConfig

    config = DenseClipConfig()
    assert config.position_embedding_interpolation == "bilinear" and not config.join_score_map_over_temperature


# ---------------------------------------------------------------------------------------------------------------------
# Batches, no detections, degenerate boxes, bad input
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_a_batch_is_each_image_on_its_own(name):
    """Two images padded to one batch: each image's results equal the model run on that image alone, with the same
    padding (the padding is part of what the model sees, as in the authors' code)."""
    inputs = DenseClipDetectionImageProcessor(size=FIXTURE_SIZE)(
        [rgb_image(name, i) for i in IMAGES], return_tensors="pt"
    )
    model = detector(name)
    with torch.no_grad():
        batch = model(**inputs)
        for index in IMAGES:
            alone = model(**{key: value[index : index + 1] for key, value in inputs.items()})
            fields = ["pred_boxes", "scores", "labels"] + ([] if is_retinanet(name) else ["pred_masks", "mask_boxes"])
            for field in fields:
                torch.testing.assert_close(
                    getattr(batch, field)[index], getattr(alone, field)[0], rtol=1e-5, atol=1e-4
                )
    assert batch.frame_sizes.tolist() == inputs["original_sizes"].tolist()


def test_frames_and_tuples():
    """Without `original_sizes` the frame is `image_sizes / scale` rounded (the original size); without metas the
    input; `return_dict=False` gives the non-`None` outputs in order."""
    model, inputs = detector("retinanet"), metas("retinanet", 1)
    with torch.no_grad():
        derived = model(**{key: value for key, value in inputs.items() if key != "original_sizes"})
        plain = model(inputs["pixel_values"], return_dict=False)
    assert torch.equal(derived.frame_sizes, inputs["original_sizes"])
    assert torch.equal(derived.pred_boxes[0], run("retinanet", 1).pred_boxes[0])
    assert isinstance(plain, tuple) and plain[3].tolist() == [list(inputs["pixel_values"].shape[-2:])]
    assert plain[0][0].shape[1] == 4 and plain[0][0].max() <= max(inputs["pixel_values"].shape[-2:])


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_no_detection_gives_empty_results_of_the_right_shapes(name):
    model = load_detector(name)
    model.config.score_threshold = 1.0  # sigmoid and softmax scores never exceed it
    with torch.no_grad():
        outputs = model(**metas(name, 0))
    assert outputs.pred_boxes[0].shape == (0, 4) and outputs.scores[0].shape == (0,)
    assert outputs.labels[0].shape == (0,) and outputs.labels[0].dtype == torch.long
    processor = DenseClipDetectionImageProcessor()
    result = processor.post_process_object_detection(outputs, threshold=0.0)[0]
    assert [tuple(value.shape) for value in result.values()] == [(0,), (0,), (0, 4)]
    if is_retinanet(name):
        return
    assert outputs.pred_masks[0].shape == (0, 28, 28) and outputs.mask_boxes[0].shape == (0, 4)
    height, width = metas(name, 0)["original_sizes"][0].tolist()
    binary = processor.post_process_instance_segmentation(outputs, threshold=0.0, return_binary_maps=True)[0]
    assert binary["segmentation"].shape == (0, height, width) and binary["segments_info"] == []
    ids = processor.post_process_instance_segmentation(outputs, threshold=0.0)[0]
    assert torch.equal(ids["segmentation"], torch.full((height, width), -1)) and ids["boxes"].shape == (0, 4)


def test_no_proposal_gives_no_detection():
    """Every anchor outside the image: every proposal is clipped to a zero-size box and dropped (`w > 0`, `h > 0`),
    and the box head then has nothing to detect."""
    anchors = [torch.tensor([[50.0, 60.0, 70.0, 90.0]] * 3)]
    proposals = rpn_proposals(
        [torch.zeros(3, 1, 1)],
        [torch.zeros(12, 1, 1)],
        anchors,
        (40, 40),
        nms_pre=1000,
        max_proposals=1000,
        iou_threshold=0.7,
        min_box_size=0,
    )
    assert proposals.shape == (0, 5)
    frame = ImageFrame((40, 40), None, (40, 40))
    boxes, scores, labels = rcnn_detections(
        proposals[:, :4],
        torch.zeros(0, 6),
        torch.zeros(0, 20),
        frame,
        box_coder_stds=(0.1, 0.1, 0.2, 0.2),
        score_threshold=0.05,
        iou_threshold=0.5,
        max_detections=100,
    )
    assert (boxes.shape, scores.shape, labels.shape) == ((0, 4), (0,), (0,))


def test_zero_size_boxes_are_pasted_as_the_authors_paste_them():
    """Degenerate detections (a box clipped to the image border has zero width) are kept, as the authors' are, and
    pasted as their `_do_paste_mask` does: a pixel's infinite normalised coordinate (x - x1) / (x2 - x1) becomes 0,
    the mask's centre, so a zero-width box gives a one-pixel-wide sliver in the column before it."""
    boxes = torch.tensor([[2.0, 2.0, 8.0, 9.0], [10.0, 3.0, 10.0, 7.0]])
    outputs = DenseClipInstanceSegmentationOutput(
        pred_boxes=(boxes,),
        scores=(torch.tensor([0.9, 0.8]),),
        labels=(torch.tensor([1, 0]),),
        frame_sizes=torch.tensor([[12, 10]]),
        pred_masks=(torch.ones(2, 28, 28),),
        mask_boxes=(boxes,),
    )
    processor = DenseClipDetectionImageProcessor()
    binary = processor.post_process_instance_segmentation(outputs, threshold=0.0, return_binary_maps=True)[0]
    assert binary["segmentation"][0, 2:9, 2:8].all() and binary["segmentation"][0].sum() == 7 * 6
    # Rows whose centres fall inside [3, 7] (3.5 ... 6.5), column 9: the centre of the mask of ones.
    assert binary["segmentation"][1].nonzero().tolist() == [[3, 9], [4, 9], [5, 9], [6, 9]]
    ids = processor.post_process_instance_segmentation(outputs, threshold=0.0)[0]
    assert [segment["label_id"] for segment in ids["segments_info"]] == [1, 0]
    assert torch.equal(ids["segmentation"] == 1, binary["segmentation"][1])


def test_post_processing_rescales_to_other_target_sizes():
    """Boxes in the frame of the outputs; another target size scales them per axis, and masks are pasted there."""
    outputs = run("maskrcnn", 0)
    processor = DenseClipDetectionImageProcessor()
    height, width = outputs.frame_sizes[0].tolist()
    own = processor.post_process_instance_segmentation(outputs, threshold=0.0, return_binary_maps=True)[0]
    doubled = processor.post_process_instance_segmentation(
        outputs, threshold=0.0, target_sizes=torch.tensor([[2 * height, 3 * width]]), return_binary_maps=True
    )[0]
    torch.testing.assert_close(doubled["boxes"], own["boxes"] * torch.tensor([3.0, 2.0, 3.0, 2.0]))
    assert doubled["segmentation"].shape == (len(own["boxes"]), 2 * height, 3 * width)
    # The same masks, finer: pixel (y, x) of the original image and the target pixel whose centre maps to its centre.
    torch.testing.assert_close(
        doubled["segmentation"][:, 0::2, 1::3].float().mean(), own["segmentation"].float().mean(), atol=0.02, rtol=0
    )


def test_thresholds_keep_scores_strictly_above():
    outputs = run("retinanet", 0)
    scores = outputs.scores[0]
    kept = DenseClipDetectionImageProcessor().post_process_object_detection(outputs, threshold=float(scores[3]))[0]
    assert torch.equal(kept["scores"], scores[:3])


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_the_smallest_input_runs(name):
    """32 pixels, one cell at stride 32: the levels beyond it (P6, and P7 for RetinaNet) are 1 x 1 as well."""
    with torch.no_grad():
        outputs = detector(name)(torch.randn(1, 3, 32, 32))
    coarse = [tuple(level.shape[-2:]) for level in outputs.feature_maps if level.shape[-1] == 1]
    assert coarse == [(1, 1)] * (3 if is_retinanet(name) else 2)
    assert outputs.pred_boxes[0].shape[1] == 4 and bool((outputs.pred_boxes[0] <= 32).all())


PIXELS = torch.zeros(1, 3, 64, 96)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(pixel_values=torch.zeros(1, 3, 16, 64)), ValueError, "at least 32"),
        (dict(pixel_values=PIXELS, image_sizes=torch.tensor([[65, 96]])), ValueError, "exceed the input"),
        (dict(pixel_values=PIXELS, image_sizes=torch.tensor([[64, 96, 3]])), ValueError, r"shape \(batch=1, 2\)"),
        (dict(pixel_values=PIXELS, image_sizes=torch.tensor([[60.5, 96.0]])), TypeError, "integer sizes"),
        (dict(pixel_values=PIXELS, image_sizes="large"), TypeError, "must be a tensor"),
        (dict(pixel_values=PIXELS, scale_factors=torch.tensor([[1.0, 0.0, 1.0, 0.0]])), ValueError, "positive"),
        (dict(pixel_values=PIXELS, original_sizes=torch.tensor([[64, 96]])), ValueError, "without scale_factors"),
        (dict(pixel_values=PIXELS, labels={"boxes": torch.zeros(0, 4)}), TypeError, "one dict per image"),
        (
            dict(pixel_values=PIXELS, labels=[{"class_labels": torch.tensor([7]), "boxes": torch.zeros(1, 4)}]),
            ValueError,
            r"in 0\.\.4",
        ),
        (
            dict(
                pixel_values=PIXELS,
                labels=[{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[5.0, 5, 4, 9]])}],
            ),
            ValueError,
            "x2 > x1",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        detector("retinanet")(**kwargs)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda p: p.post_process_object_detection((torch.zeros(1, 4),)), TypeError, "`pred_boxes`"),
        (lambda p: p.post_process_instance_segmentation(run("retinanet", 0)), TypeError, "`pred_masks`"),
        (
            lambda p: p.post_process_object_detection(run("retinanet", 0), target_sizes=[(1, 2), (3, 4)]),
            ValueError,
            "one positive",
        ),
    ],
)
def test_bad_post_processing_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call(DenseClipDetectionImageProcessor())
