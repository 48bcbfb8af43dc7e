"""The analyses after the fits: encoding summaries and transfer matrices, classification probes,
MI bounds, embeddings, figures.

One --type per analysis (the numbers come from encoding_results.py and results_utils.py,
the pictures from figures.py); `--help` lists every type with what it does (the first
paragraph of its function's docstring, TASKS below).
Outputs go under ROOT/results, ROOT/classification_preds and (summaries, transfer matrices)
ROOT/encoding_results; reruns skip finished ROIs.
"""

import inspect
import sys
from pathlib import Path

import options
import safe_io
import utils

# The heavy helpers load on first use, so that --help answers at once.
encoding_results = options.lazy_import("encoding_results")
figures = options.lazy_import("figures")
published_results = options.lazy_import("published_results")
ru = options.lazy_import("results_utils")

# --- Options ---
ROOT = "."  # project folder holding the data folders (training_fmri, training_images, roi_masks, ...)
TYPE = "classification-task"  # the analysis (each is listed below with what it does)
DATASET = "caltech256"  # classification dataset in ROOT/datasets/<name>: caltech256, places365, imagenet, sun397
METHOD = "cl-tuned"  # tuned models to analyse: cl-tuned or reg-tuned (save-embeddings also untuned; pooled types set it)
SUBJECTS: list[int] = []  # subjects to process (empty: every SubjX folder under ROOT/roi_masks)
HEMISPHERES = ["left", "right"]  # hemispheres to process
ROIS: list[str] = []  # ROIs (default: every ROI with a checkpoint, or for the fMRI-only types every ROI, with enough voxels)
EPOCHS: int | None = None  # epochs in the checkpoint names (default: 30, or 75 for reg-tuned)
WEIGHTS = "imagenet"  # untuned AlexNet: imagenet, none (seeded random) or a state-dict path
SEED = 0  # seed of random weights and of random-rois-list
DEVICE = "auto"  # auto, cpu or cuda
IMAGE_SIZE = 224  # image side given to AlexNet (probes: Resize(size*256/224) + CenterCrop(size))
BATCH_SIZE = 256  # images per forward pass
EMBEDDING_LAYER = "classifier.5"  # save-embeddings: an AlexNet layer (default fc7, the authors'), '' for the model output (CL embedding, regression prediction, untuned fc8) or 'best' (the ROI's best encoding layer)
EMBEDDING_SPLIT = "test"  # save-embeddings: test (the authors': test split in split order, rows as save-test-fmri-responses) or all (sorted file order)
N_RANDOM_ROIS = 30  # random-rois-list: how many (subject, hemisphere, ROI) to draw, among ROIs with more than ANALYSIS_MIN_VOXELS
MIN_VOXELS = utils.MIN_VOXELS  # embeddings, test fMRI, transfer matrices: ROIs with fewer voxels are left out or absent (1, the authors'; 20: the paper's 2024 figures)
ANALYSIS_MIN_VOXELS = utils.ANALYSIS_MIN_VOXELS  # probes of subject models and the MI bound's subjects: ROIs with fewer voxels are left out (the authors' 20)
FEATURE_PRECISION = "fp32"  # features for probes, MI and embeddings: fp32 (the authors') or bf16 (autocast, faster on GPU)
IMAGE_INDEX = 0  # salience-maps: which test image of DATASET (position in the 15% split)
MESH = "fsaverage5"  # paper-figures: cortical maps on nilearn's fsaverage5, or a FreeSurfer fsaverage folder (surf/lh.inflated, ...) for full resolution
MAPS = "all"  # paper-figures cortical maps: all, summary (per subject the CL gain and the winning method) or none
PROTOCOL = "untuned-layer"  # transfer-matrix: the results to read, untuned-layer (the authors': transfer and untuned control at the untuned layer and alphas) or per-method
TRANSFER_AGGREGATION = "authors"  # transfer-matrix: authors (unweighted mean over the ROIs present in every subject), absent-zero (every ROI, absent = 0) or voxels (pooled)
SOURCE = "results"  # paper-figures and compare-published: results (ROOT's saved results) or published (the authors' published results in published/)
TOLERANCE = 0.02  # compare-published: a result whose mean CV r differs from the published one by more is flagged
OVERWRITE = False  # recompute results that exist
# ---
# CHOICES["TYPE"] is the list of TASKS, set below them.
CHOICES = {"DATASET": utils.CLASSIFICATION_DATASETS, "METHOD": utils.METHODS, "HEMISPHERES": utils.HEMISPHERE_NAMES,
           "ROIS": utils.ROIS, "EMBEDDING_LAYER": utils.LAYERS + ["", "best"], "EMBEDDING_SPLIT": utils.EMBEDDING_SPLITS,
           "FEATURE_PRECISION": utils.PRECISIONS, "MAPS": utils.CORTICAL_MAPS,
           "PROTOCOL": utils.PROTOCOLS, "TRANSFER_AGGREGATION": utils.TRANSFER_AGGREGATIONS,
           "SOURCE": ["results", "published"]}
# With SOURCE published, the figures and the scorecard read the published subjects, which need no roi_masks folder.
SUBJECT = options.Allowed(
    f"{utils.SUBJECT.text}, or with --source published any of 1-{utils.N_SUBJECTS}",
    lambda subj, opts: 1 <= subj <= utils.N_SUBJECTS if opts.SOURCE == "published" else utils.SUBJECT.test(subj, opts),
    found=lambda opts: "the published results hold subjects 1-8" if opts.SOURCE == "published" else utils.SUBJECT.found(opts))
RANGES = {"SUBJECTS": SUBJECT, "HEMISPHERES": utils.HEMISPHERE_LIST, "EPOCHS": options.at_least(1), "SEED": options.SEED_RANGE,
          "IMAGE_SIZE": utils.ALEXNET_INPUT, "BATCH_SIZE": options.at_least(1), "N_RANDOM_ROIS": options.at_least(1),
          "MIN_VOXELS": options.at_least(1), "ANALYSIS_MIN_VOXELS": options.at_least(1), "IMAGE_INDEX": options.at_least(0),
          "TOLERANCE": options.above(0)}


def subjects(opts):
    """SUBJECTS, or when empty every SubjX folder under ROOT/roi_masks."""
    return opts.SUBJECTS or utils.find_subjects(opts.ROOT)


def model_subjects(opts, method):
    """The subjects whose models are analysed: ``subjects(opts)``, or [None] for the pooled models."""
    return [None] if method.startswith("pooled") else subjects(opts)


def summaries(opts, model_opts):
    """Per subject: methods.csv, layer_scores.csv, group_summary.csv and their figures, rebuilt from the saved
    encoding results."""
    for subj in subjects(opts):
        table, results = encoding_results.write_summaries(opts.ROOT, subj)
        if table.empty:
            raise safe_io.UserError(f"no encoding results under {utils.encoding_dir(opts.ROOT, subj)}: "
                                    "run fit_encoding_models.py first")
        figures.summary_figures(opts.ROOT, subj, table, results)
        print(f"wrote the summaries of {len(table)} results under {utils.encoding_dir(opts.ROOT, subj)}")


def transfer_matrix(opts, model_opts):
    """Model subject x target subject matrices of METHOD per ROI group, over HEMISPHERES together: the fraction
    of voxels where the transfer beats untuned, and the mean test r.

    Returns (table, {group: (mean_r, frac, stem)})."""
    method = model_opts["method"]
    table, matrices = encoding_results.write_transfer_matrices(
        opts.ROOT, method, opts.HEMISPHERES, opts.ROIS or utils.ROIS, opts.PROTOCOL, opts.MIN_VOXELS,
        opts.TRANSFER_AGGREGATION)
    hemis = "/".join(sorted(set(table["hemisphere"])))
    for group, (mean_r, frac, stem) in matrices.items():
        figures.plot_transfer(mean_r, frac, f"{method} ({opts.PROTOCOL}) {hemis} {group} ROIs "
                                            f"({opts.TRANSFER_AGGREGATION})", f"{stem}.png")
        print(f"{group} ROIs, fraction of voxels above untuned (rows: model subject, columns: target subject)\n"
              f"{frac.round(3)}")
    return table, matrices


def classification(opts, model_opts):
    """fc7 features of the untuned and the tuned AlexNets, StandardScaler + logistic regression fitted on 85% of
    DATASET, accuracy and class probabilities on the other 15%."""
    method, epochs = model_opts["method"], model_opts["epochs"]
    for subj in model_subjects(opts, method):
        for h in opts.HEMISPHERES:
            summary = ru.classification_task(dataset=opts.DATASET, subj=subj, hemisphere=h, rois=opts.ROIS,
                                             batch_size=opts.BATCH_SIZE, overwrite=opts.OVERWRITE,
                                             precision=opts.FEATURE_PRECISION,
                                             min_voxels=opts.ANALYSIS_MIN_VOXELS, **model_opts)
            print(f"{opts.DATASET} {ru.summary_stem(method, subj, h, epochs)}: untuned {summary['untuned']:.3f}, "
                  + ", ".join(f"{r} {a:.3f}" for r, a in summary["rois"].items()))


def lower_bound_mi(opts, model_opts):
    """InfoNCE lower bound on the mutual information between image and fMRI embeddings on each subject's test
    split, at tau 0.3 and the best post-hoc temperature, against the untuned reference."""
    method = model_opts["method"]
    for subj in model_subjects(opts, method):
        for h in opts.HEMISPHERES:
            summary = ru.mi_task(opts.ROOT, method, subj, h, opts.ROIS, model_opts["epochs"], model_opts["device"],
                                 opts.BATCH_SIZE, opts.OVERWRITE, opts.FEATURE_PRECISION, opts.ANALYSIS_MIN_VOXELS)
            for roi, per_subj in summary["rois"].items():
                for s, res in per_subj.items():
                    tuned, untuned = res["tuned"], res["untuned"]
                    print(f"subj{s} {utils.hemi_code(h)} {roi}: {tuned['bits']:.3f} bits, "
                          f"{tuned['scaled_bits']:.3f} after temperature scaling "
                          f"(untuned {untuned['bits']:.3f} and {untuned['scaled_bits']:.3f}; "
                          f"at most log2 K = {tuned['log2_K']:.3f})")


def voxel_counts(opts, model_opts):
    """The voxel count of every subject, hemisphere and ROI: results/voxel_counts.csv."""
    path = utils.results_dir(opts.ROOT) / "voxel_counts.csv"
    safe_io.atomic_write_text(ru.voxel_counts(opts.ROOT).to_csv(index=False), path)
    print(f"wrote {path}")


def save_embeddings(opts, model_opts):
    """EMBEDDING_LAYER features of the images of EMBEDDING_SPLIT for every ROI's model, row for row with
    the NSD ids."""
    for subj in subjects(opts):
        for h in opts.HEMISPHERES:
            for path in ru.save_embeddings(subj=subj, hemisphere=h, rois=opts.ROIS, layer=opts.EMBEDDING_LAYER,
                                           split=opts.EMBEDDING_SPLIT, batch_size=opts.BATCH_SIZE,
                                           overwrite=opts.OVERWRITE, precision=opts.FEATURE_PRECISION,
                                           min_voxels=opts.MIN_VOXELS, **model_opts):
                print(f"wrote {path}")


def save_test_fmri(opts, model_opts):
    """The fMRI of every ROI on the test split, row for row with the NSD ids."""
    for path in ru.save_test_fmri(opts.ROOT, subjects(opts), opts.HEMISPHERES, opts.ROIS, opts.OVERWRITE,
                                  opts.MIN_VOXELS):
        print(f"wrote {path}")


def random_rois(opts, model_opts):
    """N_RANDOM_ROIS random (subject, hemisphere, ROI) with more than ANALYSIS_MIN_VOXELS voxels."""
    chosen = ru.random_rois(ru.voxel_counts(opts.ROOT), opts.N_RANDOM_ROIS, opts.SEED, opts.ANALYSIS_MIN_VOXELS)
    path = utils.results_dir(opts.ROOT) / f"random_rois_n{opts.N_RANDOM_ROIS}_seed{opts.SEED}.csv"
    safe_io.atomic_write_text(chosen.to_csv(index=False), path)
    print(chosen.to_string(index=False))
    print(f"wrote {path}")


def results_figures(opts, model_opts):
    """ROI x subject heatmaps of the probe accuracy and the MI bound of METHOD."""
    for path in figures.results_figures(opts.ROOT, opts.DATASET, model_opts["method"], model_opts["epochs"]):
        print(f"wrote {path}")


def salience_maps(opts, model_opts):
    """Grad-CAM (true class) of the untuned, left and right models of one ROI on one test image of DATASET
    and its mirror."""
    if len(opts.ROIS) != 1 or len(opts.SUBJECTS) != 1:
        raise safe_io.UserError(f"salience-maps takes one subject and one ROI, got --subjects {opts.SUBJECTS} "
                              f"--rois {opts.ROIS}: pass e.g. --subjects 1 --rois V1v")
    maps = ru.salience_maps(dataset=opts.DATASET, subj=opts.SUBJECTS[0], roi=opts.ROIS[0],
                            image_index=opts.IMAGE_INDEX, **model_opts)
    for path in figures.salience_figure(opts.ROOT, opts.DATASET, model_opts["method"], opts.SUBJECTS[0],
                                        opts.ROIS[0], opts.IMAGE_INDEX, model_opts["epochs"], maps):
        print(f"wrote {path}")


def paper_figures(opts, model_opts):
    """Every figure of the paper that has its inputs, cortical maps included (MAPS, MESH), from ROOT's results or
    (SOURCE published) the authors' published ones; one line per figure skipped."""
    paths, skipped = figures.paper_figures(opts.ROOT, model_opts["epochs"], opts.MESH, maps=opts.MAPS, source=opts.SOURCE,
                                           min_voxels=opts.MIN_VOXELS)
    for line in skipped:
        print(line)
    print(f"wrote {len(paths)} files under {figures.paper_dir(opts.ROOT, opts.SOURCE)}")
    if paths:
        index(opts, model_opts)
    return paths


def results_table(opts, model_opts):
    """results/encoding_results.csv: every NSD encoding result of SUBJECTS, one row each (encoding_results.results_table)."""
    table = encoding_results.results_table(opts.ROOT, subjects(opts))
    if table.empty:
        raise safe_io.UserError(f"no encoding results of subjects {' '.join(map(str, subjects(opts)))} under "
                                f"{Path(opts.ROOT) / 'encoding_results'}: run fit_encoding_models.py first")
    path = utils.results_dir(opts.ROOT) / "encoding_results.csv"
    safe_io.atomic_write_text(table.to_csv(index=False), path)
    print(f"wrote {len(table)} results of {table['subject'].nunique()} subject(s) to {path}")
    return table


def index(opts, model_opts):
    """results/figures/index.html: every figure under ROOT with its caption and the command that made it."""
    path, sections = figures.write_index(opts.ROOT)
    print(f"wrote {path}: {sum(map(len, sections.values()))} figures; open it in a web browser")
    return path, sections


def compare_published(opts, model_opts):
    """ROOT's own-subject, per-method NSD encoding results (SOURCE published: the published ones
    themselves) held against the authors' published results: a scorecard CSV, group means, a scatter
    and a printed verdict (TOLERANCE)."""
    if opts.SOURCE == "published":
        yours = published = published_results.load_results()
    else:
        yours = encoding_results.load_encoding(opts.ROOT)
        published = published_results.load_results(subjects=sorted(yours))
    card = published_results.scorecard(yours, published, opts.TOLERANCE)
    means = published_results.compared_group_means(card)
    folder = utils.results_dir(opts.ROOT) / "published_comparison"
    safe_io.atomic_write_text(card.to_csv(index=False), folder / "scorecard.csv")
    safe_io.atomic_write_text(means.to_csv(index=False), folder / "group_means.csv")
    paths = figures.plot_scorecard(card, folder / "scorecard")
    print("\n".join(published_results.verdict(card, means, opts.TOLERANCE)))
    print(f"wrote {folder / 'scorecard.csv'}, {folder / 'group_means.csv'} and {', '.join(p.name for p in paths)}")
    return card, means


TASKS = {"summaries": summaries, "transfer-matrix": transfer_matrix, "classification-task": classification, "classification-task-pooled-avg": classification,
         "classification-task-pooled-const": classification, "lower-bound-mi": lower_bound_mi,
         "lower-bound-mi-pooled-avg": lower_bound_mi, "lower-bound-mi-pooled-const": lower_bound_mi,
         "voxel-counts": voxel_counts, "save-embeddings": save_embeddings, "save-test-fmri-responses": save_test_fmri,
         "random-rois-list": random_rois, "figures": results_figures, "salience-maps": salience_maps,
         "paper-figures": paper_figures, "compare-published": compare_published, "results-table": results_table,
         "index": index}


def _what(name, task):
    """A --type's line in --help: the first paragraph of its task's docstring, and which models a pooled type reads."""
    if "pooled" in name:
        return f"as {name.rsplit('-', 2)[0]}, of the models pooled over subjects (h-{name.rsplit('-', 1)[1]})"
    return " ".join(inspect.getdoc(task).split("\n\n")[0].split())


CHOICES["TYPE"] = {name: _what(name, task) for name, task in TASKS.items()}


@options.cli
def main(argv=None):
    opts = options.parse_options(sys.modules[__name__], argv)
    model_opts = check_inputs(opts)
    return TASKS[opts.TYPE](opts, model_opts)


def check_inputs(opts):
    """The output folders and the device, checked before any work; returns the model options of the
    tasks (root, method, epochs, weights, device, image_size, seed)."""
    safe_io.check_writable(utils.results_dir(opts.ROOT), utils.classification_preds_dir(opts.ROOT),
                           Path(opts.ROOT) / "encoding_results", utils.cache_dir(opts.ROOT))
    method = "pooled-" + opts.TYPE.rsplit("-", 1)[1] if "pooled" in opts.TYPE else opts.METHOD
    epochs = opts.EPOCHS
    if epochs is None:
        epochs = utils.DEFAULT_EPOCHS.get(method, utils.DEFAULT_EPOCHS["cl-tuned"])
    return dict(root=opts.ROOT, method=method, epochs=epochs, weights=opts.WEIGHTS,
                device=utils.resolve_device(opts.DEVICE), image_size=opts.IMAGE_SIZE, seed=opts.SEED)


if __name__ == "__main__":
    main()
