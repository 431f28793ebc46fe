"""The output's OME-Zarr metadata, read back by the ome-zarr reader."""

from __future__ import annotations

from pathlib import Path

import zarr

from tilewise.pipeline.output import CLASS_COLOURS, OutputLayout, OutputStore, class_colours


def test_labels_carry_class_names_and_colours_as_ome_image_label(tmp_path: Path) -> None:
    layout = OutputLayout(40, 60, 3, 32, None, "uint8", "float16", "zstd", None,
                          ["background", "stroma", "nuclei"])  # fmt: skip
    OutputStore(str(tmp_path / "out.zarr")).prepare(
        layout, fingerprint="f", job={}, carried={}, overwrite=False
    )
    attrs = zarr.open_group(tmp_path / "out.zarr/labels", mode="r").attrs["ome"]
    label = attrs["image-label"]
    assert [p["name"] for p in label["properties"]] == ["background", "stroma", "nuclei"]
    assert [c["label-value"] for c in label["colors"]] == [0, 1, 2]
    assert [c["rgba"] for c in label["colors"]] == [list(c) for c in CLASS_COLOURS[:3]]
    assert len({tuple(c) for c in class_colours(len(CLASS_COLOURS))}) == len(CLASS_COLOURS)

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(tmp_path / "out.zarr/labels")))())
    assert nodes, "the ome-zarr reader found no image"
    node = nodes[0]
    assert any(isinstance(spec, Label) for spec in node.specs)  # read as a label image
    assert node.data[0].shape == (40, 60)
    assert node.metadata["properties"] == {
        0: {"name": "background"}, 1: {"name": "stroma"}, 2: {"name": "nuclei"}
    }  # fmt: skip
    for k in range(3):  # the reader gives colours as 0..1 floats
        assert node.metadata["color"][k] == [v / 255 for v in CLASS_COLOURS[k]]


def test_a_sigmoid_network_labels_background_and_its_class() -> None:
    from tilewise.pipeline.output import image_label

    label = image_label(1, ["tumour"])
    assert [p["name"] for p in label["properties"]] == ["background", "tumour"]
    assert [c["label-value"] for c in label["colors"]] == [0, 1]
