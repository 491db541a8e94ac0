package ringcache

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/ringcache/ringcache/clients/go/gen/ringcache/v1"
)

func answer(value string, version uint64) *nearAnswer {
	return &nearAnswer{found: true, value: []byte(value), version: version}
}

func TestAFillThatReadBeforeAChangeIsNeverStored(t *testing.T) {
	n, err := newNearCache(1<<20, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer n.close()
	now := time.Now()
	before := n.ticket("k")
	n.invalidate("k") // a change of k seen while the read was out
	n.fill("k", before, answer("old", 1), now)
	if _, ok := n.get("k", now); ok {
		t.Fatal("a fill that read before the change was stored")
	}
	n.fill("k", n.ticket("k"), answer("new", 2), now)
	if a, ok := n.get("k", now); !ok || string(a.value) != "new" {
		t.Fatalf("a fill after the change: %v %v", a, ok)
	}
	// Voiding everything refuses fills that read before too.
	before = n.ticket("other")
	n.invalidateMatching(nil)
	if _, ok := n.get("k", now); ok {
		t.Fatal("k survived invalidating everything")
	}
	n.fill("other", before, answer("x", 1), now)
	if _, ok := n.get("other", now); ok {
		t.Fatal("a fill that read before everything was voided was stored")
	}
}

func TestOfTwoRacingFillsTheOlderAnswerNeverReplacesTheNewer(t *testing.T) {
	n, err := newNearCache(1<<20, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer n.close()
	now := time.Now()
	slow, fast := n.ticket("k"), n.ticket("k")
	n.fill("k", fast, answer("new", 2), now)
	n.fill("k", slow, answer("old", 1), now)
	n.fill("k", n.ticket("k"), &nearAnswer{}, now) // an absence read earlier
	if a, ok := n.get("k", now); !ok || a.version != 2 {
		t.Fatalf("held %+v %v, want version 2", a, ok)
	}
	n.fill("k", n.ticket("k"), answer("newer", 3), now)
	if a, ok := n.get("k", now); !ok || a.version != 3 {
		t.Fatalf("held %+v %v, want version 3", a, ok)
	}
}

func TestVoidingSomeKeysKeepsTheOthers(t *testing.T) {
	n, err := newNearCache(1<<20, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer n.close()
	now := time.Now()
	for i := range 100 {
		key := fmt.Sprintf("k%d", i)
		n.fill(key, n.ticket(key), answer("v", 1), now)
	}
	n.invalidateMatching(func(key string) bool { return strings.HasSuffix(key, "7") })
	for i := range 100 {
		key := fmt.Sprintf("k%d", i)
		_, ok := n.get(key, now)
		if want := !strings.HasSuffix(key, "7"); ok != want {
			t.Fatalf("%s held: %v, want %v", key, ok, want)
		}
	}
}

func TestAnAnswerIsNeverServedPastItsMaximumAgeOrItsKeysExpiry(t *testing.T) {
	n, err := newNearCache(1<<20, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer n.close()
	now := time.Now()
	n.fill("aged", n.ticket("aged"), answer("v", 1), now)
	if _, ok := n.get("aged", now.Add(59*time.Second)); !ok {
		t.Fatal("an answer younger than the maximum age was not served")
	}
	if _, ok := n.get("aged", now.Add(time.Minute)); ok {
		t.Fatal("an answer was served at its maximum age")
	}
	expiring := answer("v", 1)
	expiring.expires = now.Add(time.Second)
	n.fill("expiring", n.ticket("expiring"), expiring, now)
	if _, ok := n.get("expiring", now.Add(time.Second)); ok {
		t.Fatal("an answer was served past its key's expiry")
	}
}

func TestTheNearCacheStaysWithinItsByteBound(t *testing.T) {
	const capacity = 64 << 10
	n, err := newNearCache(capacity, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer n.close()
	now := time.Now()
	value := strings.Repeat("x", 1000)
	for i := range 5000 {
		key := fmt.Sprintf("key-%d", i)
		n.fill(key, n.ticket(key), answer(value, 1), now)
	}
	n.entries.CleanUp()
	if got := n.entries.WeightedSize(); got > capacity {
		t.Fatalf("%d bytes held, bound %d", got, capacity)
	}
	if got := n.entries.EstimatedSize(); got == 0 || got > capacity/1000 {
		t.Fatalf("%d entries of about 1 KiB held in %d bytes", got, capacity)
	}
}

// nearClient is a client of a three-node, two-replica cluster with a 1 MiB
// near cache, and a plain client of the same orchestrator.
func nearClient(t testing.TB, nodes, replicas int, args ...string) (near, other *Client, addrs []string, procs []*exec.Cmd) {
	t.Helper()
	for range nodes {
		cmd, addr := startProcess(t, "cache-node")
		addrs, procs = append(addrs, addr), append(procs, cmd)
	}
	orchestrator := start(t, "orchestrator", append([]string{"--nodes", strings.Join(addrs, ","),
		"--replicas", fmt.Sprint(replicas), "--health-interval", "100ms"}, args...)...)
	near, err := Dial(orchestrator, WithNearCache(1<<20), WithTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = near.Close() })
	other, err = Dial(orchestrator, WithTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Close() })
	return near, other, addrs, procs
}

// waitNearHit reads key until the near cache answers it.
func waitNearHit(t testing.TB, c *Client, key string) {
	t.Helper()
	readUntil(t, c, key, "answered from the near cache", func(c *Client) uint64 { return c.NearCacheStats().Hits })
}

// timeToSee reads key through c until it reads want ("" : a miss), and
// answers how long that took after since.
func timeToSee(t *testing.T, c *Client, key, want string, since time.Time) time.Duration {
	t.Helper()
	for {
		item, err := c.Get(context.Background(), key)
		switch {
		case want == "" && errors.Is(err, ErrCacheMiss):
			return time.Since(since)
		case err == nil && string(item.Value) == want:
			return time.Since(since)
		case err != nil && !errors.Is(err, ErrCacheMiss):
			t.Fatal(err)
		}
		if time.Since(since) > 5*time.Second {
			t.Fatalf("%s still reads %q (%v), not %q", key, item.Value, err, want)
		}
	}
}

func TestTheNearCacheAnswersHitsLocallyAndSeesEveryOtherClientsWriteWithinMilliseconds(t *testing.T) {
	near, other, _, _ := nearClient(t, 3, 2)
	ctx := context.Background()
	if _, err := near.Set(ctx, "k", []byte("v0"), 0); err != nil {
		t.Fatal(err)
	}
	waitNearHit(t, near, "k")

	// Another client writes and deletes through the orchestrator; the
	// nodes' feeds void the near cache's answer.
	var seen []time.Duration
	for i := 1; i <= 40; i++ {
		value := fmt.Sprintf("v%d", i)
		if _, err := other.Set(ctx, "k", []byte(value), 0); err != nil {
			t.Fatal(err)
		}
		seen = append(seen, timeToSee(t, near, "k", value, time.Now()))
		waitNearHit(t, near, "k")
	}
	if _, err := other.Delete(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	seen = append(seen, timeToSee(t, near, "k", "", time.Now()))
	slices.Sort(seen)
	t.Logf("another client's write seen by the near cache after: p50 %v, p99 %v, max %v",
		seen[len(seen)/2], seen[len(seen)*99/100], seen[len(seen)-1])

	// Its own writes: read back at once, never the cached older value.
	for i := range 50 {
		value := fmt.Sprintf("own-%d", i)
		if _, err := near.Set(ctx, "own", []byte(value), 0); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			item, err := near.Get(ctx, "own")
			if err != nil || string(item.Value) != value {
				t.Fatalf("wrote %q, read back %q (%v)", value, item.Value, err)
			}
		}
	}
	if _, err := near.Delete(ctx, "own"); err != nil {
		t.Fatal(err)
	}
	if _, err := near.Get(ctx, "own"); !errors.Is(err, ErrCacheMiss) {
		t.Fatalf("deleted by this client, read: %v", err)
	}
	// A caller changing what it was given does not change the cache.
	if _, err := near.Set(ctx, "kept", []byte("value"), time.Minute); err != nil {
		t.Fatal(err)
	}
	waitNearHit(t, near, "kept")
	item, err := near.Get(ctx, "kept")
	if err != nil || item.TTL <= 0 || item.TTL > time.Minute {
		t.Fatalf("a hit keeps the key's time left: %+v %v", item, err)
	}
	item.Value[0] = 'X'
	if again, _ := near.Get(ctx, "kept"); string(again.Value) != "value" {
		t.Fatalf("the cached answer changed with the caller's copy: %q", again.Value)
	}
	stats := near.NearCacheStats()
	if stats.Hits < 40 || stats.Entries < 1 || stats.Bytes == 0 || stats.Bytes > 1<<20 || stats.Capacity != 1<<20 {
		t.Fatalf("%+v", stats)
	}
}

func TestWhileAFeedIsCutTheNearCacheAnswersNothingAndReadsStayCorrect(t *testing.T) {
	near, other, addrs, procs := nearClient(t, 2, 1, "--eject-after", "1000")
	ctx := context.Background()
	if _, err := near.Set(ctx, "k", []byte("before"), 0); err != nil {
		t.Fatal(err)
	}
	waitNearHit(t, near, "k")
	// Freeze the node that does not own "k": its feed goes silent and is
	// lost after 3 s, so the client can no longer vouch for anything it
	// could have changed — every answer is read again.
	conn, err := grpc.NewClient(near.conn.Target(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	located, err := pb.NewClusterClient(conn).Locate(ctx, &pb.LocateRequest{Key: "k"})
	if err != nil {
		t.Fatal(err)
	}
	frozen := procs[0]
	if addrs[0] == located.GetOwners()[0].GetAddress() {
		frozen = procs[1]
	}
	_ = frozen.Process.Signal(syscall.SIGSTOP)
	waitStopped(t, frozen.Process.Pid)
	time.Sleep(4 * time.Second)
	hits := near.NearCacheStats().Hits
	if _, err := other.Set(ctx, "k", []byte("during"), 0); err != nil {
		t.Fatal(err)
	}
	for range 20 {
		item, err := near.Get(ctx, "k")
		if err != nil || string(item.Value) != "during" {
			t.Fatalf("read %q (%v) while a feed was lost, after a write of \"during\"", item.Value, err)
		}
	}
	if got := near.NearCacheStats().Hits; got != hits {
		t.Fatalf("%d answers from the near cache while a feed was lost", got-hits)
	}
	_ = frozen.Process.Signal(syscall.SIGCONT)
	// Followed again: hits come back, and they are current.
	waitNearHit(t, near, "k")
	if item, err := near.Get(ctx, "k"); err != nil || string(item.Value) != "during" {
		t.Fatalf("read %q (%v) after the feed came back", item.Value, err)
	}
}

func TestANearCacheNeedsAPositiveMaximumAge(t *testing.T) {
	if _, err := Dial("127.0.0.1:1", WithNearCache(1<<20), WithNearCacheMaxAge(0)); err == nil {
		t.Fatal("a near cache with no maximum age was accepted")
	}
}

// BenchmarkNearCacheHit is Get of a key the near cache holds (a 100-byte
// value), against a real cluster: the coherence check, the lookup and the
// value's copy. go test -run '^$' -bench NearCacheHit (the binaries built).
func BenchmarkNearCacheHit(b *testing.B) {
	near, _, _, _ := nearClient(b, 3, 2)
	ctx := context.Background()
	if _, err := near.Set(ctx, "bench", []byte(strings.Repeat("v", 100)), 0); err != nil {
		b.Fatal(err)
	}
	waitNearHit(b, near, "bench")
	before := near.NearCacheStats().Hits
	b.ReportAllocs()
	for b.Loop() {
		if _, err := near.Get(ctx, "bench"); err != nil {
			b.Fatal(err)
		}
	}
	if hits := near.NearCacheStats().Hits - before; hits != uint64(b.N) {
		b.Fatalf("%d of %d reads were near-cache hits", hits, b.N)
	}
}
