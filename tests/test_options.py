"""Request options: where they come from, and 400s that name the option and the allowed values."""

import pytest

from segserve.errors import InvalidOption
from segserve.options import Options, parse_options


def parse(inputs=None, headers=None, config=None):
    return parse_options(inputs or {"body": b"x"}, headers or {}, config)


def test_defaults(config):
    assert parse(config=config) == Options()


@pytest.mark.parametrize("inputs, headers, expected", [
    ({"body": b"x"}, {"Accept": "image/png"}, "png"),
    ({"body": b"x"}, {"accept": "image/jpeg"}, "overlay"),
    ({"body": b"x"}, {"Accept": "application/x-npy"}, "probs"),
    ({"body": b"x"}, {"Accept": "*/*"}, "json"),
    ({"body": b"x"}, {"Accept": "text/html, image/png;q=0.9"}, "png"),
    ({"body": b"x"}, {"url_path": "rle"}, "rle"),
    ({"data": b"x", "format": bytearray(b"polygons")}, {"Accept": "image/png"}, "polygons"),
    ({"body": {"image": "..", "format": "PNG"}}, {}, "png"),
])
def test_format_sources_in_order(config, inputs, headers, expected):
    assert parse(inputs, headers, config).format == expected


def test_tile_from_form_or_json(config):
    assert parse(config=config).tile == "auto"
    assert parse({"data": b"x", "tile": b"On "}, config=config).tile == "on"
    assert parse({"body": {"image": "..", "tile": "off"}}, config=config).tile == "off"


def test_classes_by_name_or_id_and_min_area(config):
    options = parse({"data": b"x", "classes": b"nucleus,1", "min_area": b"25"}, config=config)
    assert options.classes == (1, 2) and options.post.min_area == 25
    assert parse({"body": {"image": "", "classes": ["cell"]}}, config=config).classes == (1,)


@pytest.mark.parametrize("inputs, words", [
    ({"data": b"x", "format": b"gif"}, ["format", "json", "polygons"]),
    ({"data": b"x", "colour": b"red"}, ["'colour'", "format, classes, tile, threshold, smooth, smooth_method"]),
    ({"data": b"x", "classes": b"mitochondria"}, ["mitochondria", "2=nucleus"]),
    ({"data": b"x", "min_area": b"-3"}, ["min_area", ">= 0"]),
    ({"data": b"x", "min_area": b"big"}, ["min_area"]),
    ({"data": b"x", "tile": b"yes"}, ["tile='yes'", "auto, on, off"]),
])
def test_bad_options_are_400_naming_option_and_choices(config, inputs, words):
    with pytest.raises(InvalidOption) as info:
        parse(inputs, config=config)
    assert info.value.status == 400
    for word in words:
        assert word in info.value.message


# -- Accept negotiation (RFC 9110) and TorchServe's {"data": ...} convention -------------------------------
@pytest.mark.parametrize("accept, expected", [
    ("image/*", "png"), ("image/png", "png"), ("image/jpeg", "overlay"), ("*/*", "json"), ("", "json"),
    ("text/html,application/xhtml+xml,*/*;q=0.8", "json"), ("image/jpeg;q=0.5, image/png", "png"),
    ("application/x-npy;q=0, image/*;q=0.2", "png"), ("application/*", "json"),
])
def test_accept_is_negotiated_by_quality_and_wildcards(config, accept, expected):
    assert parse({"data": b"x"}, {"Accept": accept} if accept else {}, config=config).format == expected


@pytest.mark.parametrize("accept", ["image/webp", "text/html", "image/png;q=0, text/csv"])
def test_an_accept_no_format_answers_is_a_406_listing_the_formats(config, accept):
    from segserve.errors import NotAcceptable

    with pytest.raises(NotAcceptable) as info:
        parse({"data": b"x"}, {"Accept": accept}, config=config)
    assert info.value.status == 406 and "png (image/png)" in info.value.message and "format=" in info.value.message
    assert parse({"data": b"x", "format": b"png"}, {"Accept": accept}, config=config).format == "png"  # format wins
