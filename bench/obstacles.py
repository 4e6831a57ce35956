"""What stands in the way of each target when a run misses it (or cannot measure it): the profiles and
measurements behind each explanation are in results.md's sections and in the closing notes of the issues.
results.md lists these under the targets table for every target that is not met."""

OBSTACLES = {
}
