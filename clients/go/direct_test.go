package ringcache

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/ringcache/ringcache/clients/go/gen/ringcache/v1"
)

func TestADebtBlocksItsKeyUntilItsHolderSettlesIt(t *testing.T) {
	m := marks{owners: map[string]*ownerMarks{}}
	now := time.Now()
	m.owe("x", "k", "y", 5)
	if !m.blocks("x", "k", now) || m.blocks("x", "other", now) || m.blocks("z", "k", now) {
		t.Fatal("a debt blocks its key on its owner only")
	}
	m.settle("x", "y", 4)
	if !m.blocks("x", "k", now) {
		t.Fatal("settled below its record: still open")
	}
	m.settle("x", "w", 9)
	if !m.blocks("x", "k", now) {
		t.Fatal("settled by another holder: still open")
	}
	m.settle("x", "y", 5)
	if m.blocks("x", "k", now) || m.keys != 0 {
		t.Fatal("settled")
	}
	// An overflow blocks every key, and its settlement asks for a listing.
	m.owe("x", "", "y", 7)
	if !m.blocks("x", "anything", now) || !m.settle("x", "y", 7) || m.blocks("x", "anything", now) {
		t.Fatal("an all-keys mark")
	}
	// This client's own write that missed the owner: until the debt is
	// seen, or long enough for a feed to have shown it.
	m.missed("x", "j", now)
	if !m.blocks("x", "j", now.Add(provisional/2)) || m.blocks("x", "j", now.Add(provisional)) {
		t.Fatal("a provisional mark lapses after its time")
	}
	m.missed("x", "i", now)
	m.owe("x", "i", "y", 8)
	m.settle("x", "y", 8)
	if m.blocks("x", "i", now) {
		t.Fatal("the debt took the provisional mark's place, and was settled")
	}
	// A restarted owner owes nothing.
	m.owe("x", "a", "y", 9)
	m.clearOwner("x")
	if m.blocks("x", "a", now) || m.keys != 0 {
		t.Fatal("cleared")
	}
}

// directCluster starts three nodes and an orchestrator with two replicas,
// and answers a direct-mode client of it and the orchestrator's address.
func directCluster(t *testing.T) (*Client, string) {
	t.Helper()
	nodes := []string{start(t, "cache-node"), start(t, "cache-node"), start(t, "cache-node")}
	orchestrator := start(t, "orchestrator", "--nodes", strings.Join(nodes, ","), "--replicas", "2",
		"--health-interval", "100ms")
	c, err := Dial(orchestrator, WithDirect(true), WithTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, orchestrator
}

func TestDirectReadsGoToTheOwnerAndSeeEveryAcknowledgedWrite(t *testing.T) {
	c, _ := directCluster(t)
	ctx := context.Background()
	if _, err := c.Set(ctx, "warm-up", []byte("x"), 0); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for c.DirectStats().Direct == 0 {
		if _, err := c.Get(ctx, "warm-up"); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no read went directly: %+v", c.DirectStats())
		}
		time.Sleep(20 * time.Millisecond)
	}
	before := c.DirectStats()
	for i := range 100 {
		key, value := fmt.Sprintf("user:%d", i), fmt.Sprintf("v%d", i)
		version, err := c.Set(ctx, key, []byte(value), 0)
		if err != nil {
			t.Fatal(err)
		}
		item, err := c.Get(ctx, key)
		if err != nil || string(item.Value) != value || item.Version != version {
			t.Fatalf("%s: read %q v%d (%v), wrote %q v%d", key, item.Value, item.Version, err, value, version)
		}
		if _, err := c.Delete(ctx, key); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Get(ctx, key); !errors.Is(err, ErrCacheMiss) {
			t.Fatalf("%s was deleted, read: %v", key, err)
		}
	}
	after := c.DirectStats()
	if direct := after.Direct - before.Direct; direct < 180 {
		t.Fatalf("most reads go straight to the owner: %d of 200 (%+v)", direct, after)
	}
}

// waitDirect reads key until one read goes straight to its owner.
func waitDirect(t testing.TB, c *Client, key string) {
	t.Helper()
	readUntil(t, c, key, "read directly", func(c *Client) uint64 { return c.DirectStats().Direct })
}

// readUntil reads key through c until count(c) grows (at most 20 s).
func readUntil(t testing.TB, c *Client, key, what string, count func(*Client) uint64) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		before := count(c)
		if _, err := c.Get(context.Background(), key); err != nil && !errors.Is(err, ErrCacheMiss) {
			t.Fatal(err)
		}
		if count(c) > before {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is never %s: %+v %+v", key, what, c.DirectStats(), c.NearCacheStats())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The case debts exist for (as integration-tests/tests/direct.rs): an
// owner misses a delete — ejected by another orchestrator while frozen —
// and comes back before anyone repaired it; this client's orchestrator
// never saw it fail. The debt on the other owner's feed keeps reads off it.
func TestADeletedKeyIsNeverReadFromAnOwnerThatMissedTheDelete(t *testing.T) {
	var nodes []string
	var procs []*exec.Cmd
	for range 3 {
		cmd, addr := startProcess(t, "cache-node")
		nodes, procs = append(nodes, addr), append(procs, cmd)
	}
	list := strings.Join(nodes, ",")
	a := start(t, "orchestrator", "--nodes", list, "--replicas", "2", "--eject-after", "1000", "--health-interval", "5s")
	b := start(t, "orchestrator", "--nodes", list, "--replicas", "2", "--health-interval", "5s",
		"--hedge-delay", "off", "--node-timeout", "500ms", "--eject-after", "2")
	c, err := Dial(a, WithDirect(true), WithTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	writer, err := Dial(b, WithTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close()
	conn, err := grpc.NewClient(b, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	api := pb.NewClusterClient(conn)
	ctx := context.Background()
	located, err := api.Locate(ctx, &pb.LocateRequest{Key: "victim"})
	if err != nil {
		t.Fatal(err)
	}
	owner := located.GetOwners()[0].GetAddress()
	var frozen *exec.Cmd
	for i, n := range nodes {
		if n == owner {
			frozen = procs[i]
		}
	}
	if _, err := c.Set(ctx, "victim", []byte("old"), 0); err != nil {
		t.Fatal(err)
	}
	waitDirect(t, c, "victim")

	_ = frozen.Process.Signal(syscall.SIGSTOP)
	waitStopped(t, frozen.Process.Pid)
	// Reads through B time out on the frozen owner until B ejects it.
	for range 2 {
		_, _ = writer.Get(ctx, "victim")
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		listed, err := api.ListNodes(ctx, &pb.ListNodesRequest{})
		ejected := false
		for _, n := range listed.GetNodes() {
			ejected = ejected || (n.GetAddress() == owner && n.GetState() == pb.NodeState_NODE_STATE_EJECTED)
		}
		if err == nil && ejected {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("B did not eject the frozen owner")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if deleted, err := writer.Delete(ctx, "victim"); err != nil || !deleted {
		t.Fatalf("delete through B: %v %v", deleted, err)
	}
	_ = frozen.Process.Signal(syscall.SIGCONT)
	// Another client's delete reaches this one on the other owner's feed.
	time.Sleep(50 * time.Millisecond)
	stale, reads := 0, 0
	for started := time.Now(); time.Since(started) < 2*time.Second; reads++ {
		if _, err := c.Get(ctx, "victim"); !errors.Is(err, ErrCacheMiss) {
			stale++
		}
	}
	if stale > 0 {
		t.Fatalf("%d of %d reads served the deleted value: %+v", stale, reads, c.DirectStats())
	}
}
