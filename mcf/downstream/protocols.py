"""FaRL's fine-tuning protocols — one per row of the paper's downstream table — and the row printer.

Every value below is read from FaRL's published configs (github.com/FacePerceiver/FaRL,
``farl/experiments/face_alignment|face_parsing/``: ``train_*_farl-b-ep16_448_refinebb.yaml``,
``trainers/*.yaml``, ``augmenters/*.yaml``, ``optimizers/refine_backbone.yaml``, ``scorers/*.yaml``)
and ``farl/datasets/prepare.py``; the README says FaRL trains on 8 GPUs. The presets use FaRL's head
(UPerHead on blocks 3, 5, 7, 11 through FaRL's 4-level pyramid) and losses (alignment: per-point
Euclidean distance + heatmap BCE; parsing: cross-entropy), stretch non-square boxes onto the square
frame as FaRL does, evaluate the test split every epoch and report the best epoch by the Full metric
(FaRL's paper values; :data:`BEST_KEYS`) beside the last. What mcf does not copy: the input
normalisation (each encoder keeps its own pre-training statistics), weight decay on biases and norms
(FaRL's 1e-5 applies to every parameter, mcf's to weight matrices only), and BatchNorm synchronised
across ranks on the CPU (per rank there; FaRL's SyncBN).
"""

from __future__ import annotations

from dataclasses import dataclass

from mcf.downstream.transforms import Augment, Photometric

# refine_backbone.yaml (alignment and parsing): AdamW, betas (0.9, 0.999), weight_decay 1e-5, backbone lr 1e-4;
# MultiStepLR(milestones=[200], gamma=0.1) stepped per epoch; no warm-up.
FARL_BACKBONE_LR = 1e-4
FARL_WEIGHT_DECAY = 1e-5
FARL_MILESTONES = (200,)
FARL_GAMMA = 0.1
FARL_GLOBAL_BATCH = 40  # train_*.yaml: batch_size=5 per GPU, README: 8 GPUs
FARL_INPUT = 448  # train_*_448_*.yaml: input_resolution=448 (the 512 frame resized inside the backbone)
FARL_EMA = 0.999  # trainers/*.yaml: main_ema decay 0.999, evaluated as network_name_eval
# augmenters/train.yaml via trainers/{aflw19,ibug300w}_farl.yaml: shift_sigma 0.05, rot_sigma 0.174 rad,
# scale_sigma 0.1, all uniform (rot_normal, scale_normal, shift_normal false).
ALIGNMENT_AUGMENT = Augment(rotate=9.97, scale=0.1, shift=0.05)  # 0.174 rad = 9.97°
# augmenters/{lapa,celebm}/train.yaml: shift_sigma 0.01 uniform; rot_sigma 0.314 rad and scale_sigma 0.1
# Gaussian (py-blueprint's defaults rot_normal = scale_normal = true).
PARSING_AUGMENT = Augment(
    rotate=17.99, scale=0.1, shift=0.01, rotate_normal=True, scale_normal=True
)  # 0.314 rad = 17.99°
# augmenters/train.yaml: RandomOcclusion, Maybe(0.5, NoiseFusion), RandomGray, RandomGamma, RandomBlur.
ALIGNMENT_COLOR = Photometric(occlusion=True, noise_p=0.5)
PARSING_COLOR = Photometric()  # augmenters/{lapa,celebm}/train.yaml: RandomGray, RandomGamma, RandomBlur


@dataclass(frozen=True)
class Protocol:
    """One benchmark's fine-tuning and evaluation settings."""

    name: str
    task: str
    title: str
    epochs: int
    lr: float  # head lr (FaRL: fpns and head)
    crop: str  # alignment: "box"; parsing: "align" (5 points → template) or "resize"
    context: float  # crop side / box side = 1 / FaRL's scale_mu
    warp_factor: float
    test_split: str
    augment: Augment
    color: Photometric
    auc_threshold: float | None = None
    auc_norm: str = "box"  # the NME the AUC and failure rate are taken of
    head: str = "uper"  # FaRL's UPerHead; 'light': mcf's soft-argmax head / light FPN
    box_stretch: bool = True  # FaRL's UpdateCropAndResizeMatrix: box width and height scaled apart
    backbone_lr: float = FARL_BACKBONE_LR
    weight_decay: float = FARL_WEIGHT_DECAY
    milestones: tuple[int, ...] = FARL_MILESTONES
    gamma: float = FARL_GAMMA
    global_batch_size: int = FARL_GLOBAL_BATCH
    img_size: int = FARL_INPUT
    ema_decay: float = FARL_EMA


PROTOCOLS = {
    # trainers/aflw19_farl.yaml: max_epoches 150, scale_mu 1.0 (the annotated box, no context), warp_factor 0;
    # optimizers/refine_backbone.yaml (alignment): fpns and heatmap_head lr 1e-2; scorers/aflw19.yaml: AUC_FR box, 0.07.
    "aflw19": Protocol(
        "aflw19",
        "alignment",
        "AFLW-19",
        epochs=150,
        lr=1e-2,
        crop="box",
        context=1.0,
        warp_factor=0.0,
        test_split="test",
        augment=ALIGNMENT_AUGMENT,
        color=ALIGNMENT_COLOR,
        auc_threshold=0.07,
    ),
    # trainers/ibug300w_farl.yaml: max_epoches 250 (lr × 0.1 after epoch 200), scale_mu 0.8 (1.25× the box), warp 0.
    # trainers/wflw_farl.yaml: max_epoches 150, scale_mu 0.8, warp 0, 98 landmarks; scorers/wflw.yaml: NME inter-ocular
    # (60, 72) and inter-pupil (96, 97), AUC_FR on inter-ocular up to 0.1; eval sets: all + 6 subsets.
    "wflw": Protocol(
        "wflw",
        "alignment",
        "WFLW",
        epochs=150,
        lr=1e-2,
        crop="box",
        context=1.25,
        warp_factor=0.0,
        test_split="test",
        augment=ALIGNMENT_AUGMENT,
        color=ALIGNMENT_COLOR,
        auc_threshold=0.1,
        auc_norm="inter_ocular",
    ),
    "300w": Protocol(
        "300w",
        "alignment",
        "300W",
        epochs=250,
        lr=1e-2,
        crop="box",
        context=1.25,
        warp_factor=0.0,
        test_split="test_full",
        augment=ALIGNMENT_AUGMENT,
        color=ALIGNMENT_COLOR,
    ),
    # trainers/lapa_farl.yaml: max_epoches 300, warp_factor 0.8; prepare.py: 5 of the 106 points → template, 512 px;
    # optimizers/refine_backbone.yaml (parsing): head lr 1e-3.
    "lapa": Protocol(
        "lapa",
        "parsing",
        "LaPa",
        epochs=300,
        lr=1e-3,
        crop="align",
        context=1.0,
        warp_factor=0.8,
        test_split="test",
        augment=PARSING_AUGMENT,
        color=PARSING_COLOR,
    ),
    # trainers/celebm_farl.yaml: max_epoches 300; prepare.py: the 512-px image as it is (identity), warp 0.
    "celebamask_hq": Protocol(
        "celebamask_hq",
        "parsing",
        "CelebAMask-HQ",
        epochs=300,
        lr=1e-3,
        crop="resize",
        context=1.0,
        warp_factor=0.0,
        test_split="test",
        augment=PARSING_AUGMENT,
        color=PARSING_COLOR,
    ),
}
TASK_PROTOCOLS = {"alignment": ("aflw19", "300w", "wflw"), "parsing": ("lapa", "celebamask_hq")}
# The Full metric that picks the best epoch (FaRL's paper values: AFLW-19 epoch 15 of 150, 300W 183 of 250),
# and whether lower is better. The whole row is printed from that epoch's evaluation.
BEST_KEYS = {
    "aflw19": ("nme_diag", "min"),
    "300w": ("nme_inter_ocular", "min"),
    "wflw": ("nme_inter_ocular", "min"),
    "lapa": ("mean_f1", "max"),
    "celebamask_hq": ("mean_f1", "max"),
}
REPORTED = "best"  # which evaluation the papers' columns are (FaRL's tables: the best epoch by the Full metric)

# Columns of the printed row: (header, metric key). NMEs and F1 in percent, the tables' unit.
LAPA_COLUMNS = (
    ("Skin", "skin"),
    ("Hair", "hair"),
    ("L-E", "left_eye"),
    ("R-E", "right_eye"),
    ("U-L", "upper_lip"),
    ("I-M", "inner_mouth"),
    ("L-L", "lower_lip"),
    ("Nose", "nose"),
    ("L-B", "left_eyebrow"),
    ("R-B", "right_eyebrow"),
)
# FaRL's scorer (scorers/celebm.yaml) names the classes painted from the release's l_ear, r_ear, l_brow, r_brow,
# l_eye, r_eye masks 'rr', 'lr', 'rb', 'lb', 're', 'le' (farl/datasets/celebamask_hq.py's order against the
# scorer's label_names): the release's "l_" is the image's left, the subject's right. FaRL's table columns come
# from those scorer names, so its L-Eye is the release's r_eye mask; mcf's metric keys keep the release's file
# names (f1/l_eye is the l_eye mask) and the printed columns follow FaRL's.
CELEBAMASK_COLUMNS = (
    ("Face", "skin"),
    ("Nose", "nose"),
    ("Glasses", "eye_g"),
    ("L-Eye", "r_eye"),
    ("R-Eye", "l_eye"),
    ("L-Brow", "r_brow"),
    ("R-Brow", "l_brow"),
    ("L-Ear", "r_ear"),
    ("R-Ear", "l_ear"),
    ("Mouth", "mouth"),
    ("U-Lip", "u_lip"),
    ("L-Lip", "l_lip"),
    ("Hair", "hair"),
    ("Hat", "hat"),
    ("Earring", "ear_r"),
    ("Necklace", "neck_l"),
    ("Neck", "neck"),
    ("Cloth", "cloth"),
)
WFLW_COLUMNS = (
    ("Large pose", "largepose"),
    ("Expression", "expression"),
    ("Illumination", "illumination"),
    ("Make-up", "makeup"),
    ("Occlusion", "occlusion"),
    ("Blur", "blur"),
)
SPLIT_SUBSETS = {
    "test_frontal": "frontal",
    "test_common": "common",
    "test_challenging": "challenging",
    **{f"test_{k}": k for _, k in WFLW_COLUMNS},
}
ROW_KEYS = {
    "aflw19": (
        ("NME_diag Full", "nme_diag_percent"),
        ("NME_diag Frontal", "frontal/nme_diag_percent"),
        ("NME_box Full", "nme_box_percent"),
        ("AUC_box@7 Full", "auc_box_7_percent"),
    ),
    "300w": (
        ("NME_io Full", "nme_inter_ocular_percent"),
        ("NME_io Common", "common/nme_inter_ocular_percent"),
        ("NME_io Challenging", "challenging/nme_inter_ocular_percent"),
        ("NME_ip Full", "nme_inter_pupil_percent"),
        ("NME_ip Common", "common/nme_inter_pupil_percent"),
        ("NME_ip Challenging", "challenging/nme_inter_pupil_percent"),
    ),
    "wflw": (
        ("NME_io Full", "nme_inter_ocular_percent"),
        *((f"NME_io {h}", f"{k}/nme_inter_ocular_percent") for h, k in WFLW_COLUMNS),
        ("FR_io@10 Full", "fr_inter_ocular_10_percent"),
        ("AUC_io@10 Full", "auc_inter_ocular_10_percent"),
    ),
    "lapa": (*((h, f"f1/{k}") for h, k in LAPA_COLUMNS), ("Mean", "mean_f1")),
    "celebamask_hq": (*((h, f"f1/{k}") for h, k in CELEBAMASK_COLUMNS), ("Mean", "mean_f1")),
}


def paper_row(
    protocol: str, metrics: dict[str, float], test_split: str | None = None
) -> tuple[list[str], list[str]]:
    """(headers, values) of the table row as FaRL's and MCF's tables print it: NMEs and AUC in percent
    with 3 and 2 decimals, F1 × 100 with 2 decimals; ``n/a`` where a column was not evaluated. When
    ``test_split`` is one subset (``test_frontal``, ``test_common``, ``test_challenging``), the metrics
    are that subset's and fill only its columns."""
    subset = SPLIT_SUBSETS.get(test_split or "")
    if subset is not None:
        metrics = {f"{subset}/{k}": v for k, v in metrics.items() if "/" not in k}
    headers, values = [], []
    for header, key in ROW_KEYS[protocol]:
        v = metrics.get(key)
        if key.startswith("f1/") or key == "mean_f1":
            text = "n/a" if v is None else f"{100 * v:.2f}"
        elif key.startswith(("auc", "fr_")):
            text = "n/a" if v is None else f"{v:.2f}"
        else:
            text = "n/a" if v is None else f"{v:.3f}"
        headers.append(header)
        values.append(text)
    return headers, values


def format_row(
    protocol: str,
    metrics: dict[str, float],
    test_split: str | None = None,
    label: str = "this run",
    more: tuple[tuple[str, dict[str, float]], ...] = (),
) -> str:
    """A Markdown table: the headers (with the unit), this run's values under ``label``, and one more row per
    ``(label, metrics)`` in ``more``."""
    headers, values = paper_row(protocol, metrics, test_split)
    unit = "F1 ×100" if PROTOCOLS[protocol].task == "parsing" else "NME, FR, AUC in %"
    lines = [
        f"| {PROTOCOLS[protocol].title} ({unit}) | " + " | ".join(headers) + " |",
        "| --- " * (len(headers) + 1) + "|",
        f"| {label} | " + " | ".join(values) + " |",
    ]
    for name, m in more:
        lines.append(f"| {name} | " + " | ".join(paper_row(protocol, m, test_split)[1]) + " |")
    return "\n".join(lines)


def is_better(protocol: str, new: dict[str, float], old: dict[str, float] | None) -> bool:
    """Whether evaluation ``new`` beats ``old`` on the protocol's Full metric (:data:`BEST_KEYS`); ties keep the
    earlier epoch; a NaN never wins."""
    key, mode = BEST_KEYS[protocol]
    v = new.get(key, float("nan"))
    if v != v:
        return False
    if old is None or old.get(key, float("nan")) != old.get(key, float("nan")):
        return True
    return v < old[key] if mode == "min" else v > old[key]


def format_best_last(protocol: str, best: dict, last: dict, test_split: str | None = None) -> str:
    """The row twice: the best evaluation (the papers' column, with its epoch) and the last one; ``best`` and
    ``last`` are ``{'epoch', 'metrics'}``."""
    key, mode = BEST_KEYS[protocol]
    return format_row(
        protocol,
        best["metrics"],
        test_split,
        label=f"best (epoch {best['epoch']}, {mode} {key}; the paper's column)",
        more=((f"last (epoch {last['epoch']})", last["metrics"]),),
    )
