package driver

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Durability of the driver's files. A reader in any process sees a file
// written with writeFileAtomic whole or not at all: it is written to a
// temporary name and renamed over the old one. fsync adds survival of a
// power loss or kernel crash, after which every task of this boot is gone
// anyway (Recover compares boot IDs); so only the record of how a task
// ended (exit.json) is fsynced, and starts and stops pay no disk flush.
const (
	durable   = true
	ephemeral = false
)

// syncAll makes every write durable; benchmarks set it to price the choice.
var syncAll = false

// writeFileAtomic replaces path with data so that a reader sees either the
// old content or the new, never a mix: write to a temporary file in the
// same directory, rename it over path. With sync, the file is fsynced before
// the rename and the directory after it, so the new content also survives a
// power loss.
func writeFileAtomic(path string, data []byte, perm fs.FileMode, sync bool) error {
	sync = sync || syncAll
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	name := tmp.Name()
	fail := func(err error) error {
		_ = tmp.Close()
		_ = os.Remove(name)
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		return fail(err)
	}
	if err := tmp.Chmod(perm); err != nil {
		return fail(err)
	}
	if sync {
		if err := tmp.Sync(); err != nil {
			return fail(err)
		}
	}
	if err := tmp.Close(); err != nil {
		_ = os.Remove(name)
		return err
	}
	if err := os.Rename(name, path); err != nil {
		_ = os.Remove(name)
		return err
	}
	if !sync {
		return nil
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func writeJSONAtomic(path string, v any, sync bool) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(path, append(data, '\n'), 0o600, sync)
}

// readJSON reads path into v. A missing file gives an error that matches
// fs.ErrNotExist.
func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil || !errors.Is(err, fs.ErrNotExist)
}
