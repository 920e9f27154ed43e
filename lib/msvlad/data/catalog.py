"""The datasets msvlad knows and the folder layouts it reads, stated once for every data module.

The bottom of `msvlad.data`: `testsets`, `trainsets` and `official` import it; it imports none of
them.

Layouts
- Test sets: ``ROOT/NAME/jpg/<image>.jpg`` + ``ROOT/NAME/gnd_NAME.pkl``, the revisitop layout. The
  pickle is a dict with ``imlist`` (database names, no extension), ``qimlist`` (query names) and
  ``gnd``, one dict per query: ``easy/hard/junk/bbx`` (revisited ROxf/RPar), ``ok/junk/bbx``
  (classic Oxford5k/Paris6k) or ``ok/query_db_index`` (INRIA Holidays, whose queries are in the
  database and are removed from their own ranking). ANY folder laid out this way is a dataset;
  the protocol is read off the gnd keys. An optional ``rotations.json`` (image name -> clockwise
  degrees) lists images to turn upright before description (Holidays, manually rotated).
- Training sets: ``ROOT/NAME/<class>/<image>.jpg`` (torchvision ImageFolder style), built from
  GLDv2-clean or SfM-120k with hard links (symlinks where hard links fail), never copies.
- Distractors: ``ROOT/NAME/NAME.txt`` lists the images under ``ROOT/NAME/jpg/``.
- A prepared folder records how it was built in its ``manifest.json`` (`msvlad.paths.MANIFEST`).
- Downloads land in ``ROOT/downloads/<host>/<path>``: the layout `wget -x` writes, which is also
  the layout a mirror must have (`msvlad.data.download`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Protocol = Literal["revisited", "classic", "holidays"]
DatasetKind = Literal["test", "train", "distractors"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
JPG = "jpg"  # the image folder of a test set or distractor set
ROTATIONS = "rotations.json"
GND_PICKLE_PROTOCOL = 4


def gnd_name(name: str) -> str:
    """File name of the ground truth of test set `name` (``gnd_NAME.pkl``)."""
    return f"gnd_{name}.pkl"


# ----------------------------------------------------------------------------- official URLs

REVISITOP_GND = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{ds}/gnd_{ds}.pkl"
CIRTORCH_GND = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/{ds}/gnd_{ds}.pkl"
OXFORD_IMAGES = ("https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",)
PARIS_IMAGES = (
    "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
    "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz",
)
HOLIDAYS_IMAGES = (
    "ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg1.tar.gz",
    "ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg2.tar.gz",
)
R1M_LIST = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt"
R1M_ARCHIVE = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.{i}.tar.gz"
R1M_NUM_ARCHIVES = 100
GLDV2_CLEAN_CSV = "https://s3.amazonaws.com/google-landmark/metadata/train_clean.csv"
GLDV2_TAR = "https://s3.amazonaws.com/google-landmark/train/images_{i:03d}.tar"
GLDV2_MD5 = "https://s3.amazonaws.com/google-landmark/md5sum/train/md5.images_{i:03d}.txt"
GLDV2_NUM_TARS = 500
SFM120K_IMAGES = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/ims/ims.tar.gz"
SFM120K_DB = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/dbs/retrieval-SfM-120k.pkl"


# ----------------------------------------------------------------------------- official datasets


@dataclass(frozen=True)
class DatasetSpec:
    """An official dataset: what it is and where it comes from (built by `msvlad.data.official`)."""

    name: str
    kind: DatasetKind
    protocol: Protocol | None
    description: str
    urls: tuple[str, ...]


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "roxford5k",
            "test",
            "revisited",
            "Revisited Oxford: 4993 db images, 70 cropped queries",
            (REVISITOP_GND.format(ds="roxford5k"), *OXFORD_IMAGES),
        ),
        DatasetSpec(
            "rparis6k",
            "test",
            "revisited",
            "Revisited Paris: 6322 db images, 70 cropped queries",
            (REVISITOP_GND.format(ds="rparis6k"), *PARIS_IMAGES),
        ),
        DatasetSpec(
            "oxford5k",
            "test",
            "classic",
            "Oxford5k (original protocol): 5063 images, 55 queries",
            (CIRTORCH_GND.format(ds="oxford5k"), *OXFORD_IMAGES),
        ),
        DatasetSpec(
            "paris6k",
            "test",
            "classic",
            "Paris6k (original protocol): 55 queries",
            (CIRTORCH_GND.format(ds="paris6k"), *PARIS_IMAGES),
        ),
        DatasetSpec(
            "holidays",
            "test",
            "holidays",
            "INRIA Holidays as distributed: 1491 images, 500 queries",
            HOLIDAYS_IMAGES,
        ),
        DatasetSpec(
            "holidays_rotated",
            "test",
            "holidays",
            "INRIA Holidays with a user-supplied list of images turned upright",
            HOLIDAYS_IMAGES,
        ),
        DatasetSpec(
            "revisitop1m",
            "distractors",
            None,
            "R1M: 1M distractor images for ROxf/RPar",
            (R1M_LIST, R1M_ARCHIVE),
        ),
        DatasetSpec(
            "gldv2_clean",
            "train",
            None,
            "Google Landmarks v2 clean train subset (class folders)",
            (GLDV2_CLEAN_CSV, GLDV2_TAR, GLDV2_MD5),
        ),
        DatasetSpec(
            "sfm120k",
            "train",
            None,
            "retrieval-SfM-120k (class = 3D-model cluster)",
            (SFM120K_DB, SFM120K_IMAGES),
        ),
    )
}


def not_found_hint(data_root: Path, name: str, kind: DatasetKind = "test") -> str:
    """How to get dataset `name` under `data_root`: prepare an official one, else lay it out."""
    if name in DATASETS:
        return (
            f"run `python -m msvlad prepare` with {name} listed in params.yaml (data.test_sets/"
            f"train_set), or call msvlad.data.official.prepare_dataset({name!r}, "
            f"{str(data_root)!r})"
        )
    folder = data_root / name
    if kind == "train":
        where = f"place images in class folders {folder}/<class>/<image>.jpg"
    else:
        where = f"place images in {folder / JPG} and the ground truth in {folder / gnd_name(name)}"
    if name.startswith("mini-"):
        where += " (or run `python -m msvlad prepare`: the mini profile builds mini-* offline)"
    return where
