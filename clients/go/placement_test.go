package ringcache

import (
	"encoding/json"
	"fmt"
	"os"
	"testing"
)

// The Go port places every key of the Rust-generated vectors exactly as
// the ringcache-placement crate does, and computes the same epochs.
func TestPlacementMatchesTheRustVectors(t *testing.T) {
	raw, err := os.ReadFile("testdata/placement_vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var vectors struct {
		PlacementVersion int `json:"placement_version"`
		Rings            []struct {
			Nodes      []string `json:"nodes"`
			Epoch      string   `json:"epoch"`
			Placements []struct {
				Key        string   `json:"key"`
				Preference []string `json:"preference"`
			} `json:"placements"`
		} `json:"rings"`
	}
	if err := json.Unmarshal(raw, &vectors); err != nil {
		t.Fatal(err)
	}
	if vectors.PlacementVersion != PlacementVersion {
		t.Fatalf("the vectors are of placement version %d, this port implements %d", vectors.PlacementVersion, PlacementVersion)
	}
	if len(vectors.Rings) == 0 {
		t.Fatal("no rings in the vectors")
	}
	checked := 0
	for _, v := range vectors.Rings {
		r := newRing(v.Nodes)
		if got := fmt.Sprintf("%016x", r.epoch()); got != v.Epoch {
			t.Errorf("ring %v: epoch %s, want %s", v.Nodes, got, v.Epoch)
		}
		for _, p := range v.Placements {
			for n := 0; n <= len(p.Preference); n++ {
				got := r.owners(p.Key, n)
				if len(got) != n {
					t.Fatalf("key %q: %d owners, want %d", p.Key, len(got), n)
				}
				for i, node := range got {
					if r.ids[node] != p.Preference[i] {
						t.Fatalf("ring of %d, key %q (%d bytes): owner %d is %s, want %s", len(v.Nodes), p.Key, len(p.Key), i, r.ids[node], p.Preference[i])
					}
				}
				checked++
			}
		}
	}
	t.Logf("%d placements checked", checked)
}
