package state

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Cache lists a store like Store.List but decodes a record file only when
// it changed since the last call. Records are replaced by rename, so a new
// inode (or size or modification time) means new content. The node agent
// lists on every scrape; with hundreds of pods most records never change.
type Cache struct {
	store *Store
	mu    sync.Mutex
	files map[string]cachedFile
}

type cachedFile struct {
	ino   uint64
	size  int64
	mtime time.Time
	rec   *Record
	err   error
}

// NewCache returns a cache over the store.
func NewCache(s *Store) *Cache { return &Cache{store: s, files: map[string]cachedFile{}} }

// List returns every record of every network and the undecodable files.
// The returned records are shared between calls: callers must not modify them.
// It includes misplaced records; Entries tells them apart.
func (c *Cache) List() ([]*Record, []BadFile, error) {
	entries, bad, err := c.Entries()
	if err != nil {
		return nil, nil, err
	}
	recs := make([]*Record, 0, len(entries))
	for _, e := range entries {
		recs = append(recs, e.Record)
	}
	return recs, bad, nil
}

// Entries is List with each record's file and whether it is misplaced
// (see Entry): a copy of a record must not be acted on as the attachment.
func (c *Cache) Entries() ([]Entry, []BadFile, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	nets, err := os.ReadDir(c.store.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		c.files = map[string]cachedFile{}
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("list state dir %s: %w", c.store.Dir, err)
	}
	seen := make(map[string]cachedFile, len(c.files))
	var out []Entry
	var bad []BadFile
	for _, n := range nets {
		if !n.IsDir() {
			continue
		}
		dir := filepath.Join(c.store.Dir, n.Name())
		entries, err := os.ReadDir(dir)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, nil, fmt.Errorf("list state dir %s: %w", dir, err)
		}
		for _, e := range entries {
			if e.IsDir() || !strings.HasSuffix(e.Name(), recordSuffix) {
				continue
			}
			p := filepath.Join(dir, e.Name())
			info, err := e.Info()
			if err != nil {
				continue // removed since the directory was read
			}
			var ino uint64
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				ino = st.Ino
			}
			cf, ok := c.files[p]
			if !ok || cf.ino != ino || cf.size != info.Size() || !cf.mtime.Equal(info.ModTime()) {
				cf = cachedFile{ino: ino, size: info.Size(), mtime: info.ModTime()}
				data, err := os.ReadFile(p)
				if err == nil {
					cf.rec, cf.err = Decode(data)
				} else {
					cf.err = err
				}
			}
			seen[p] = cf
			if cf.err != nil {
				bad = append(bad, BadFile{p, cf.err})
				continue
			}
			out = append(out, Entry{Path: p, Record: cf.rec, Store: c.store, Misplaced: p != c.store.path(cf.rec.Key())})
		}
	}
	c.files = seen
	return out, bad, nil
}

// Caches lists the records of several state directories (one per qoscni
// network configuration that names its own stateDir), each through a
// Cache of its own.
type Caches struct {
	mu    sync.Mutex
	byDir map[string]*Cache
}

// NewCaches returns an empty set of caches.
func NewCaches() *Caches { return &Caches{byDir: map[string]*Cache{}} }

// Entries lists every record of every directory of dirs, each Entry with
// the Store of its directory. A directory that cannot be listed is
// reported in errs and the others are still listed: a caller that must
// know every record (link GC) checks errs. The caches of directories no
// longer in dirs are dropped.
func (c *Caches) Entries(dirs []string) ([]Entry, []BadFile, []error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	next := make(map[string]*Cache, len(dirs))
	var out []Entry
	var bad []BadFile
	var errs []error
	for _, d := range dirs {
		if _, dup := next[d]; dup {
			continue
		}
		cache := c.byDir[d]
		if cache == nil {
			cache = NewCache(New(d))
		}
		next[d] = cache
		entries, b, err := cache.Entries()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, entries...)
		bad = append(bad, b...)
	}
	c.byDir = next
	return out, bad, errs
}
