"""The run directory: every output of a command (a label set being
generated or imported, a training run, a rounds work directory) is opened
through `rundir.RunDir`, which owns its lock (and, in a bucket, the `lease`
other hosts respect), the resume/overwrite policy and local staging. It
knows no command's file names: each command declares its `RunKind`."""
