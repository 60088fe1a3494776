"""Masks -> a DICOM SEG (highdicom) referencing its source instance.

The SEG has a segment per class asked for (background aside), labelled with the class's name, coded with its
concepts in handler.classes (code, category), in the class's colour, made by the model (algorithm: the model's
name and version): BINARY from the served masks (each frame equal to the PNG mask's pixels of that class), or
FRACTIONAL (probability, 8-bit) from the classes' probabilities. What it carries of the source is what highdicom
copies because the SEG IOD requires it (the Patient and General Study modules, the frame of reference and
references to the source instance): nothing else of the source, no private tags.
"""

from __future__ import annotations

import io

import numpy as np

from ..config import ServingConfig
from ..errors import InternalError, RequestError, UnprocessableImage
from ..masks import MaskSet
from . import require
from .dicom import DicomSource, quiet

MANUFACTURER = "segserve"
MAX_FRACTION = 255  # FRACTIONAL: 8-bit probabilities


def segment_classes(config: ServingConfig, classes: tuple[int, ...] | None) -> list[int]:
    """The class ids that become segments: those asked for, or all, never the background (class 0)."""
    return [c for c in (classes if classes else range(config.num_classes)) if c != 0]


def dicom_seg(outputs: list, source: DicomSource, config: ServingConfig, classes: tuple[int, ...] | None,
              fractional: bool = False) -> bytes:
    """The SEG file's bytes for the frames' masks (MaskSets), or their float16 probabilities (`fractional`)."""
    hd = require("highdicom")
    pydicom = require("pydicom")
    codes = require("pydicom.sr.codedict").codes
    ids = segment_classes(config, classes)
    if not ids:
        raise UnprocessableImage("a DICOM SEG needs a class besides the background: ask for classes=... other "
                                 "than 0")
    if fractional:
        # (frames, H, W, segments) probabilities of the classes asked for, in the order asked (heads.probabilities).
        asked = list(classes) if classes else list(range(config.num_classes))
        pixels = np.stack([np.stack([np.asarray(probs[asked.index(c)], np.float32) for c in ids], axis=-1)
                           for probs in outputs])
    else:
        pixels = np.stack([np.stack([MaskSet.of(masks).binary(c) for c in ids], axis=-1) for masks in outputs])
    algorithm = hd.AlgorithmIdentificationSequence(name=config.name, family=codes.cid7162.ArtificialIntelligence,
                                                   version=config.version)
    descriptions = []
    for number, class_id in enumerate(ids, start=1):
        name = config.classes[class_id].name
        code = config.classes[class_id].segment_code
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=hd.sr.CodedConcept(*code.category),
            segmented_property_type=hd.sr.CodedConcept(*code.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            # the class's colour (handler.classes), which viewers show the segment in, as the PNG palette does
            display_color=hd.color.CIELabColor.from_rgb(*config.classes[class_id].color)))
    try:
        with quiet():
            seg = hd.seg.Segmentation(
                source_images=[source.dataset], pixel_array=pixels,
                segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
                else hd.seg.SegmentationTypeValues.BINARY,
                fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY, max_fractional_value=MAX_FRACTION,
                segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=1,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
                manufacturer_model_name=config.name, software_versions=config.version, device_serial_number="0",
                series_description=f"{config.name} segmentation", omit_empty_frames=False)
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, seg, enforce_file_format=True)
    except RequestError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # The source lacks what a SEG must reference; highdicom's text may quote the source's values.
        raise UnprocessableImage(f"a DICOM SEG could not be made for this source ({type(exc).__name__}): it "
                                 "lacks an attribute a SEG must reference; ask for format=png or json") from None
    except Exception as exc:  # noqa: BLE001 - a failure of ours, told without the library's text
        raise InternalError(f"the DICOM SEG could not be written ({type(exc).__name__})") from None
    return buffer.getvalue()
