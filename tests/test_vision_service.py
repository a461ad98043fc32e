"""The running vision service: health, options, refusals of bad input, and batching that never changes results."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from dvd.v2 import vision_pb2, vision_pb2_grpc
from tests.helpers.vision import Encoded, encode, encode_sync, noise_image, png_header_only, request

GOOD = encode(noise_image(896, 448, seed=11), "JPEG")  # 2x1 grid + thumbnail


def _metadata(address: str) -> vision_pb2.VisionMetadata:
    with grpc.insecure_channel(address) as ch:
        return vision_pb2_grpc.VisionServiceStub(ch).Metadata(vision_pb2.MetadataRequest(), timeout=10)


def test_metadata(vision_tiny: str, vision_tiny_flash: str) -> None:
    plain, flash = _metadata(vision_tiny), _metadata(vision_tiny_flash)
    assert (plain.flash, flash.flash) == (False, True)
    assert plain.hidden_size == 128 and plain.max_tiles == 12 and list(plain.devices) == ["cpu"]


def test_stream_layout(vision_tiny: str) -> None:
    images = [encode(noise_image(1000, 500, seed=1), "PNG"), GOOD]
    got = encode_sync(vision_tiny, request(images))
    order = [(t.image_index, t.tile_index) for t in got.tiles]
    assert order == sorted(order) and order[0] == (0, 0)
    for i, summary in enumerate(got.summary.images):
        tiles = got.image_tiles(i)
        assert [t.tile_index for t in tiles] == list(range(summary.num_tiles))
        assert all(t.num_tiles == summary.num_tiles and t.datatype == "BF16" for t in tiles)
        assert all(len(got.payload(t)) == t.nbytes == t.shape[0] * t.shape[1] * 2 for t in tiles)
        assert summary.num_tokens == 256 * summary.num_tiles
    assert (got.summary.images[0].width, got.summary.images[0].height) == (1000, 500)
    assert got.summary.compute_seconds > 0


def test_max_tiles_option(vision_tiny: str) -> None:
    wide = encode(noise_image(1800, 500, seed=2), "PNG")
    assert len(encode_sync(vision_tiny, request([wide])).tiles) == 5  # 4x1 grid + thumbnail
    assert len(encode_sync(vision_tiny, request([wide], max_tiles=2)).tiles) == 3
    assert len(encode_sync(vision_tiny, request([wide], max_tiles=1)).tiles) == 1


def test_per_image_tile_caps(vision_tiny: str) -> None:
    """A file's max_tiles caps that image on its own (image_url.detail "low" = 1); 0 keeps the request's budget."""
    wide = encode(noise_image(1800, 500, seed=2), "PNG")
    got = encode_sync(vision_tiny, request([wide, wide, wide], max_tiles=2, file_max_tiles=(1, 0, 12)))
    assert [s.num_tiles for s in got.summary.images] == [1, 3, 5]  # 1 tile; 2x1 + thumbnail; 4x1 + thumbnail


BAD_CASES = {
    "empty-request": (request([]), "no images or videos"),
    "corrupt": (request([b"\x89PNG\r\n\x1a\nnot really"]), "image 0"),
    "truncated": (request([GOOD, GOOD[: len(GOOD) // 2]]), "image 1: corrupt or truncated"),
    "unsupported": (request([encode(noise_image(30, 30), "TIFF")]), "unsupported image format"),
    "zero-bytes": (request([GOOD, b""]), "image 1: empty"),
    "zero-size": (request([png_header_only(0, 5)]), "corrupt"),
    "bomb": (request([png_header_only(30000, 30000)]), "decompression bomb"),
    "too-many-images": (request([GOOD] * 17), "17 images"),
    "too-many-tiles": (request([GOOD], max_tiles=13), "max_tiles 13"),
    "too-many-tiles-for-one-image": (request([GOOD, GOOD], file_max_tiles=(1, 13)), "max_tiles 13"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_invalid_argument_and_server_keeps_serving(vision_tiny_flash: str, case: str) -> None:
    req, message = BAD_CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        encode_sync(vision_tiny_flash, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert len(encode_sync(vision_tiny_flash, request([GOOD])).tiles) == 3


def test_too_many_bytes(vision_tiny: str) -> None:
    big = b"\xff\xd8" + bytes(20 * 2**20)  # just over the default 20 MiB per image
    with pytest.raises(grpc.RpcError) as err:
        encode_sync(vision_tiny, request([big]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in err.value.details()
    assert encode_sync(vision_tiny, request([GOOD])).tiles


def test_cancelled_client_does_not_hurt_the_server(vision_tiny: str) -> None:
    heavy = request([encode(noise_image(1800, 1400, seed=s), "PNG") for s in range(3)])
    with pytest.raises(grpc.RpcError) as err:
        encode_sync(vision_tiny, heavy, timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert encode_sync(vision_tiny, request([GOOD])).tiles


def _busy(address: str, target: vision_pb2.EncodeRequest, n_others: int) -> Encoded:
    """`target` submitted in the middle of a crowd of other requests; returns the target's result."""
    others = [request([encode(noise_image(300 + 211 * k, 900 - 97 * k, seed=20 + k), "JPEG")] * (1 + k % 2),
                      request_id=f"other-{k}") for k in range(n_others)]
    with ThreadPoolExecutor(max_workers=n_others + 1) as pool:
        before = [pool.submit(encode_sync, address, r) for r in others[: n_others // 2]]
        mine = pool.submit(encode_sync, address, target)
        after = [pool.submit(encode_sync, address, r) for r in others[n_others // 2:]]
        for f in before + after:
            assert f.result().tiles
        return mine.result()


@pytest.mark.parametrize("fixture", ["vision_tiny_flash", "vision_tiny"])
def test_batching_never_changes_a_result(fixture: str, request_fixture: pytest.FixtureRequest) -> None:
    """Same request alone and inside busy batches: identical decisions and identical bytes."""
    address = request_fixture.getfixturevalue(fixture)
    target = request([encode(noise_image(1100, 700, seed=9), "PNG"), encode(noise_image(500, 900, seed=8), "WEBP"),
                      GOOD], request_id="target")
    alone = encode_sync(address, target)
    assert _busy(address, target, 5).fingerprint() == alone.fingerprint()
    if fixture == "vision_tiny_flash":
        assert any(t.compressed for t in alone.tiles) and not all(t.compressed for t in alone.tiles)


@pytest.fixture
def request_fixture(request: pytest.FixtureRequest) -> pytest.FixtureRequest:
    """pytest's `request` fixture under a name that does not clash with the helper `request()`."""
    return request
