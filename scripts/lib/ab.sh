# Same-box A/B of two revisions on the device machine (see scripts/ab_stage):
#   ab_use NAME    copy the files scripts/ab_stage put in .ab/NAME over the tree
#                  (NAME current: the working tree's own again)

ab_use() {
  [ -d ".ab/$1" ] || { echo "ab_use: no .ab/$1 (run scripts/ab_stage here first)" >&2; return 1; }
  cp -pr ".ab/$1/." .
  echo "ab: $1 ($(find ".ab/$1" -type f | wc -l) files)"
}
