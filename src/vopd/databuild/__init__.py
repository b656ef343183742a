"""``vopd data build``: Vision-OPD training data from a folder of images, with no human labels.

The paper's data pipeline (Vision-OPD-6K, docs/data_build.md), as stages that each resume from
their own cache:

1. **regions** (:mod:`.regions`): evidence boxes from a file (a detector's output) or proposed by
   a model (:mod:`vopd.proposals`), kept when small (area ratio, minimum side);
2. **questions** (:mod:`.writer`): a writer model behind an OpenAI-compatible endpoint sees the
   crop (and optionally the full image with the box drawn) and writes one four-option question;
3. **filter** (:mod:`.filtering`): a filter model answers each question several times on the crop;
   kept when its majority agrees with the writer in more than ``agree`` of the samples;
4. **write** (:mod:`.pipeline`): records, a summary of every drop and its reason, a gallery.

Entry point: :func:`vopd.databuild.pipeline.build_dataset` with a
:class:`vopd.databuild.settings.BuildConfig`. This package file imports nothing, so
``vopd --help`` stays fast.
"""
