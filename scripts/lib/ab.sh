# Same-box A/B of two revisions on the device machine (see scripts/ab_stage):
#   ab_use NAME    copy the files scripts/ab_stage put in .ab/NAME over the tree, the tree's
#                  own saved in .ab/current the first time each is replaced
#   ab_use current the tree's own files again (those saved; none replaced yet: nothing to do)

ab_use() {
  local name=$1 path
  if [ "$name" = current ]; then
    [ -d .ab/current ] && cp -pr .ab/current/. .
    echo "ab: current ($(find .ab/current -type f 2>/dev/null | wc -l) files)"
    return 0
  fi
  [ -d ".ab/$name" ] || { echo "ab_use: no .ab/$name (run scripts/ab_stage here first)" >&2; return 1; }
  while IFS= read -r path; do   # the tree's copy, before any variant replaced it
    [ -e ".ab/current/$path" ] && continue
    mkdir -p ".ab/current/$(dirname "$path")"
    cp -p "$path" ".ab/current/$path"
  done < <(cd ".ab/$name" && find . -type f | sed 's|^\./||')
  cp -pr ".ab/$name/." .
  echo "ab: $name ($(find ".ab/$name" -type f | wc -l) files)"
}
