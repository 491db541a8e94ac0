package ringcache

import (
	"sort"
	"strings"

	"github.com/zeebo/xxh3"
)

// PlacementVersion is the version of the placement algorithm this client
// implements: rendezvous hashing over xxh3 of the key and of each node
// identity, mixed by fmix64, ties to the lower identity. It is the
// ringcache-placement crate's PLACEMENT_VERSION; the port is checked
// against the vectors that crate generates (testdata/placement_vectors.json).
const PlacementVersion = 1

// ring places keys on nodes exactly as the orchestrator does.
type ring struct {
	ids   []string
	seeds []uint64
}

// newRing makes the ring of the given identities (duplicates dropped),
// sorted so a node's index does not depend on the order it came in.
func newRing(ids []string) *ring {
	sorted := append([]string(nil), ids...)
	sort.Strings(sorted)
	out := sorted[:0]
	for i, id := range sorted {
		if i == 0 || id != sorted[i-1] {
			out = append(out, id)
		}
	}
	r := &ring{ids: out, seeds: make([]uint64, len(out))}
	for i, id := range out {
		r.seeds[i] = xxh3.HashString(id)
	}
	return r
}

// fmix64 is MurmurHash3's 64-bit finalizer.
func fmix64(k uint64) uint64 {
	k ^= k >> 33
	k *= 0xff51afd7ed558ccd
	k ^= k >> 33
	k *= 0xc4ceb9fe1a85ec53
	k ^= k >> 33
	return k
}

// epoch is the digest of the ring's identities, as the orchestrator
// reports it (ListNodes, WatchTopology) and sends it to nodes.
func (r *ring) epoch() uint64 {
	var b strings.Builder
	for _, id := range r.ids {
		b.WriteString(id)
		b.WriteByte(0)
	}
	return xxh3.HashString(b.String())
}

// owners returns the indices of the n most preferred nodes for key, most
// preferred first.
func (r *ring) owners(key string, n int) []int {
	if n > len(r.ids) {
		n = len(r.ids)
	}
	if n <= 0 {
		return nil
	}
	hash := xxh3.HashString(key)
	type scored struct {
		score uint64
		node  int
	}
	best := make([]scored, 0, n)
	for i, seed := range r.seeds {
		score := fmix64(hash ^ seed)
		// Ties go to the lower index, which comes first in this loop.
		at := len(best)
		for j, b := range best {
			if score > b.score {
				at = j
				break
			}
		}
		if at < n {
			if len(best) == n {
				best = best[:n-1]
			}
			best = append(best, scored{})
			copy(best[at+1:], best[at:])
			best[at] = scored{score, i}
		}
	}
	nodes := make([]int, len(best))
	for i, b := range best {
		nodes[i] = b.node
	}
	return nodes
}
