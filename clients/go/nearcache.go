package ringcache

import (
	"math"
	"sync"
	"time"

	"github.com/maypok86/otter/v2"
	"github.com/zeebo/xxh3"
)

// The near cache: answers of Get kept in this process, bounded in bytes
// and in age, and kept fresh by the nodes' change feeds — the Go port of
// the ringcache-nearcache crate the Rust client uses (its module
// documentation explains the design at length).
//
// Consistency. This client voids a key's answer once its own write or
// delete of it has been answered, and others' as the feeds report them.
// A read that fills the cache could race such a change (it read the old
// value from the node, the change's invalidation ran, then the fill stored
// the old value): a fill takes a ticket — the invalidation count of the
// key's stripe — before it reads, and stores its answer only if the count
// has not moved since. The check and the store run under the stripe's
// lock, as does an invalidation's count and removal, so one runs wholly
// before the other: an old answer is either refused or removed, never
// visible after the change was seen. What the client cannot see (a feed
// lost, a gap in it, a node restarted) voids what that node could have
// changed, and refuses every fill that read before.

const (
	// nearStripes: invalidation counters; a key's is picked by its hash.
	nearStripes = 1024
	// NearCacheEntryOverhead is what an answer costs beyond its key and
	// value bytes (the entry, the cache's node, allocation headers), as
	// the Rust client counts it.
	NearCacheEntryOverhead = 96
	// DefaultNearCacheMaxAge is how long an answer is served at most
	// unless WithNearCacheMaxAge says otherwise.
	DefaultNearCacheMaxAge = 30 * time.Second
)

// nearAnswer is a cached Get answer.
type nearAnswer struct {
	found   bool
	value   []byte
	version uint64
	// expires: when the key itself expires (zero: no expiry).
	expires time.Time
	// freshUntil: until when this answer may be served (the maximum age).
	freshUntil time.Time
}

// nearTicket is what a read saw of its key's stripe before it went to the
// node.
type nearTicket struct {
	stripe int
	seen   uint64
}

type nearStripe struct {
	mu    sync.Mutex
	count uint64
}

type nearCache struct {
	entries  *otter.Cache[string, *nearAnswer]
	stripes  [nearStripes]nearStripe
	maxAge   time.Duration
	capacity uint64
}

// nearWeight is what an answer of key and value costs in the cache.
func nearWeight(key string, value []byte) uint64 {
	return uint64(len(key)) + uint64(len(value)) + NearCacheEntryOverhead
}

func newNearCache(capacity uint64, maxAge time.Duration) (*nearCache, error) {
	entries, err := otter.New(&otter.Options[string, *nearAnswer]{
		MaximumWeight: capacity,
		Weigher: func(key string, a *nearAnswer) uint32 {
			return uint32(min(nearWeight(key, a.value), math.MaxUint32))
		},
		// The bound when nothing else voids an answer; get checks it too,
		// so an answer is never served past it between clean-ups.
		ExpiryCalculator: otter.ExpiryWriting[string, *nearAnswer](maxAge),
	})
	if err != nil {
		return nil, err
	}
	return &nearCache{entries: entries, maxAge: maxAge, capacity: capacity}, nil
}

func (n *nearCache) stripe(key string) int {
	return int(xxh3.HashString(key) % nearStripes)
}

// get answers key's cached answer if it may still be served.
func (n *nearCache) get(key string, now time.Time) (*nearAnswer, bool) {
	a, ok := n.entries.GetIfPresent(key)
	if !ok {
		return nil, false
	}
	if !now.Before(a.freshUntil) || (!a.expires.IsZero() && !now.Before(a.expires)) {
		n.entries.Invalidate(key)
		return nil, false
	}
	return a, true
}

// ticket is taken before reading key from a node, to fill with its answer.
func (n *nearCache) ticket(key string) nearTicket {
	i := n.stripe(key)
	s := &n.stripes[i]
	s.mu.Lock()
	defer s.mu.Unlock()
	return nearTicket{stripe: i, seen: s.count}
}

// fill keeps a, read after t was taken, unless a change of a key of its
// stripe was seen since, or a newer answer is held (two fills raced: the
// slower one read earlier; versions only grow).
func (n *nearCache) fill(key string, t nearTicket, a *nearAnswer, now time.Time) {
	a.freshUntil = now.Add(n.maxAge)
	s := &n.stripes[t.stripe]
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.count != t.seen {
		return
	}
	if held, ok := n.entries.GetIfPresent(key); ok && held.found && held.version > a.version &&
		now.Before(held.freshUntil) && (held.expires.IsZero() || now.Before(held.expires)) {
		return
	}
	n.entries.Set(key, a)
}

// invalidate: a change of key was seen (a write answered, or on a feed);
// its answer, and every fill that read before, are void.
func (n *nearCache) invalidate(key string) {
	s := &n.stripes[n.stripe(key)]
	s.mu.Lock()
	defer s.mu.Unlock()
	s.count++
	n.entries.Invalidate(key)
}

// invalidateMatching voids the answers of the keys drop names, and every
// fill that read before (drop nil: everything).
func (n *nearCache) invalidateMatching(drop func(key string) bool) {
	// Counts move first, each under its lock as in invalidate: a fill that
	// checked its stripe before stored an answer the sweep below removes;
	// one that checks after is refused.
	for i := range n.stripes {
		s := &n.stripes[i]
		s.mu.Lock()
		s.count++
		s.mu.Unlock()
	}
	if drop == nil {
		n.entries.InvalidateAll()
		return
	}
	for key := range n.entries.Keys() {
		if drop(key) {
			n.entries.Invalidate(key)
		}
	}
}

func (n *nearCache) close() {
	n.entries.StopAllGoroutines()
}

// NearCacheStats are the near cache's counts (all zero without one).
type NearCacheStats struct {
	// Hits: Gets answered from the near cache.
	Hits uint64
	// Misses: Gets the near cache could not answer (not held, or not safe
	// to answer from while a feed is out of sync).
	Misses uint64
	// Entries: answers held now (an estimate, as the cache keeps it).
	Entries uint64
	// Bytes: what they weigh now (keys, values, NearCacheEntryOverhead
	// each).
	Bytes uint64
	// Capacity: the most bytes held (WithNearCache).
	Capacity uint64
}

// NearCacheStats answers the near cache's counts (zero without one).
func (c *Client) NearCacheStats() NearCacheStats {
	if c.direct == nil || c.direct.near == nil {
		return NearCacheStats{}
	}
	d := c.direct
	d.near.entries.CleanUp()
	return NearCacheStats{
		Hits:     d.nearHits.Load(),
		Misses:   d.nearMisses.Load(),
		Entries:  uint64(d.near.entries.EstimatedSize()),
		Bytes:    d.near.entries.WeightedSize(),
		Capacity: d.near.capacity,
	}
}
