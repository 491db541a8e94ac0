package ringcache

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
)

// binDir is where the ringcache binaries are: $RINGCACHE_BIN_DIR
// (scripts/test.sh sets it), or the workspace's target/debug.
func binDir(t testing.TB) string {
	t.Helper()
	dir, asked := os.LookupEnv("RINGCACHE_BIN_DIR")
	if dir == "" {
		dir = filepath.Join("..", "..", "target", "debug")
	}
	for _, name := range []string{"cache-node", "orchestrator"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			if asked {
				// Named on purpose (scripts/test.sh does): their absence is
				// a failure, not a reason to skip.
				t.Fatalf("%s not found in RINGCACHE_BIN_DIR=%s", name, dir)
			}
			t.Skipf("%s not found in %s: these tests run the real binaries; build them (cargo build --bins) or set RINGCACHE_BIN_DIR", name, dir)
		}
	}
	return dir
}

// start runs a ringcache binary on free ports and answers the gRPC
// address it logs once it is serving.
func start(t testing.TB, name string, args ...string) string {
	t.Helper()
	_, addr := startProcess(t, name, args...)
	return addr
}

// startProcess is start, answering the process too.
func startProcess(t testing.TB, name string, args ...string) (*exec.Cmd, string) {
	t.Helper()
	args = append([]string{"--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "json"}, args...)
	cmd := exec.Command(filepath.Join(binDir(t), name), args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	addr := make(chan string, 1)
	go func() {
		lines := bufio.NewScanner(stderr)
		for lines.Scan() {
			var line struct {
				Message string `json:"message"`
				GRPC    string `json:"grpc"`
			}
			if json.Unmarshal(lines.Bytes(), &line) == nil && strings.HasSuffix(line.Message, "serving") && line.GRPC != "" {
				addr <- line.GRPC
			}
		}
	}()
	select {
	case a := <-addr:
		return cmd, a
	case <-time.After(30 * time.Second):
		t.Fatalf("%s did not start serving", name)
		return nil, ""
	}
}

// proxy forwards connections to target until cut closes them all.
type proxy struct {
	addr  string
	mu    sync.Mutex
	conns []net.Conn
}

func startProxy(t *testing.T, target string) *proxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	p := &proxy{addr: l.Addr().String()}
	go func() {
		for {
			client, err := l.Accept()
			if err != nil {
				return
			}
			server, err := net.Dial("tcp", target)
			if err != nil {
				_ = client.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, client, server)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(server, client); _ = server.Close() }()
			go func() { _, _ = io.Copy(client, server); _ = client.Close() }()
		}
	}()
	return p
}

// cut closes every connection made so far (new ones are still accepted).
func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.conns = nil
}

// cluster starts two cache nodes and an orchestrator, and answers a
// client of the orchestrator.
func cluster(t *testing.T) *Client {
	t.Helper()
	nodes := []string{start(t, "cache-node"), start(t, "cache-node")}
	orchestrator := start(t, "orchestrator", "--nodes", strings.Join(nodes, ","))
	c, err := Dial(orchestrator)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	// The orchestrator serves once a node answered its health check.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		_, err := c.Get(ctx, "warm-up")
		if err == nil || errors.Is(err, ErrCacheMiss) {
			return c
		}
		if ctx.Err() != nil {
			t.Fatalf("orchestrator not ready: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestSetGetDeleteThroughTheOrchestrator(t *testing.T) {
	c := cluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	if _, err := c.Get(ctx, "user:42"); !errors.Is(err, ErrCacheMiss) {
		t.Fatalf("empty cache: got %v, want ErrCacheMiss", err)
	}
	v1, err := c.Set(ctx, "user:42", []byte(`{"name":"Ada"}`), time.Minute)
	if err != nil || v1 == 0 {
		t.Fatalf("Set: %d, %v", v1, err)
	}
	item, err := c.Get(ctx, "user:42")
	if err != nil {
		t.Fatal(err)
	}
	if string(item.Value) != `{"name":"Ada"}` || item.Version != v1 {
		t.Fatalf("Get: %+v, want the value at version %d", item, v1)
	}
	if item.TTL <= 55*time.Second || item.TTL > time.Minute {
		t.Fatalf("TTL %v, want just under 1m", item.TTL)
	}
	noTTL, err := c.Set(ctx, "forever", []byte("x"), 0)
	if err != nil || noTTL == 0 {
		t.Fatal(err)
	}
	if item, _ := c.Get(ctx, "forever"); item.TTL != 0 {
		t.Fatalf("no TTL given, got %v", item.TTL)
	}

	deleted, err := c.Delete(ctx, "user:42")
	if err != nil || !deleted {
		t.Fatalf("Delete: %v, %v", deleted, err)
	}
	if _, err := c.Get(ctx, "user:42"); !errors.Is(err, ErrCacheMiss) {
		t.Fatalf("after Delete: %v", err)
	}
	if deleted, err := c.Delete(ctx, "user:42"); err != nil || deleted {
		t.Fatalf("second Delete: %v, %v", deleted, err)
	}
}

func TestConditionalWrites(t *testing.T) {
	c := cluster(t)
	ctx := context.Background()
	stored, v1, err := c.SetIfAbsent(ctx, "lock", []byte("a"), time.Minute)
	if err != nil || !stored {
		t.Fatalf("SetIfAbsent on an empty key: %v, %v", stored, err)
	}
	if stored, _, _ := c.SetIfAbsent(ctx, "lock", []byte("b"), time.Minute); stored {
		t.Fatal("SetIfAbsent on a held key stored")
	}
	stored, v2, err := c.CompareAndSwap(ctx, "lock", []byte("c"), time.Minute, v1)
	if err != nil || !stored || v2 <= v1 {
		t.Fatalf("CompareAndSwap at the current version: %v %d %v", stored, v2, err)
	}
	stored, current, err := c.CompareAndSwap(ctx, "lock", []byte("d"), time.Minute, v1)
	if err != nil || stored || current != v2 {
		t.Fatalf("CompareAndSwap at an old version: %v %d %v (current %d)", stored, current, err, v2)
	}
	if deleted, _ := c.CompareAndDelete(ctx, "lock", v1); deleted {
		t.Fatal("CompareAndDelete at an old version deleted")
	}
	if deleted, err := c.CompareAndDelete(ctx, "lock", v2); err != nil || !deleted {
		t.Fatalf("CompareAndDelete at the current version: %v %v", deleted, err)
	}
	if _, _, err := c.CompareAndSwap(ctx, "lock", nil, 0, 0); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("version 0: %v", err)
	}
}

func TestBatchesAnswerInOrder(t *testing.T) {
	c := cluster(t)
	ctx := context.Background()
	var entries []Entry
	for _, k := range []string{"a", "b", "c", "d", "e", "f"} {
		entries = append(entries, Entry{Key: k, Value: []byte("v-" + k), TTL: time.Hour})
	}
	set, err := c.SetMany(ctx, entries)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range set {
		if r.Key != entries[i].Key || r.Err != nil || r.Version == 0 {
			t.Fatalf("SetMany[%d]: %+v", i, r)
		}
	}
	got, err := c.GetMany(ctx, []string{"f", "missing", "a"})
	if err != nil {
		t.Fatal(err)
	}
	if string(got[0].Item.Value) != "v-f" || got[0].Err != nil {
		t.Fatalf("GetMany[0]: %+v", got[0])
	}
	if !errors.Is(got[1].Err, ErrCacheMiss) {
		t.Fatalf("GetMany[1]: %+v", got[1])
	}
	if string(got[2].Item.Value) != "v-a" || got[2].Item.Version != set[0].Version {
		t.Fatalf("GetMany[2]: %+v", got[2])
	}
}

func TestErrorsKeepTheirGRPCCode(t *testing.T) {
	c := cluster(t)
	ctx := context.Background()
	_, err := c.Get(ctx, "")
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("empty key: %v", err)
	}
	_, err = c.Set(ctx, strings.Repeat("k", 1<<20), nil, 0)
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "key") {
		t.Fatalf("huge key: %v", err)
	}
	if _, err := c.Set(ctx, "k", nil, -time.Second); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("negative TTL: %v", err)
	}
	short, cancel := context.WithTimeout(ctx, time.Nanosecond)
	defer cancel()
	time.Sleep(time.Millisecond)
	if _, err := c.Get(short, "k"); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("expired context: %v", err)
	}
}

// The retry loop itself, with calls that fail as a server would.
func TestRetriesOnlyWhatIsSafeAndWithinTheDeadline(t *testing.T) {
	c := &Client{retry: RetryPolicy{Attempts: 4, Backoff: time.Millisecond, MaxBackoff: 4 * time.Millisecond}}
	ctx := context.Background()

	calls := 0
	err := c.do(ctx, true, func(context.Context) error {
		calls++
		if calls < 3 {
			return status.Error(codes.Unavailable, "no node")
		}
		return nil
	})
	if err != nil || calls != 3 {
		t.Fatalf("a read, UNAVAILABLE twice then OK: %v after %d calls", err, calls)
	}

	// A write whose connection broke may have run: not sent again.
	calls = 0
	err = c.do(ctx, false, func(context.Context) error {
		calls++
		return status.Error(codes.Unavailable, "connection reset")
	})
	if status.Code(err) != codes.Unavailable || calls != 1 {
		t.Fatalf("a write, UNAVAILABLE: %v after %d calls, want 1", err, calls)
	}

	// Shedding refused it before it ran: sent again, read or write.
	for _, read := range []bool{true, false} {
		calls = 0
		err = c.do(ctx, read, func(context.Context) error {
			calls++
			return status.Error(codes.ResourceExhausted, "server is at its limit of 10 in-flight requests (--max-in-flight); retry with backoff")
		})
		if status.Code(err) != codes.ResourceExhausted || calls != 4 {
			t.Fatalf("always shed (read %v): %v after %d calls, want 4", read, err, calls)
		}
	}

	// "Too large" is not shedding: asking again gets the same answer.
	calls = 0
	err = c.do(ctx, true, func(context.Context) error {
		calls++
		return status.Error(codes.ResourceExhausted, "grpc: received message larger than max (5000000 vs. 4194304)")
	})
	if status.Code(err) != codes.ResourceExhausted || calls != 1 {
		t.Fatalf("too large: %v after %d calls, want 1", err, calls)
	}

	// The servers' ErrorInfo decides over the message.
	withReason := func(reason, message string) error {
		s, err := status.New(codes.ResourceExhausted, message).WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: errorDomain})
		if err != nil {
			t.Fatal(err)
		}
		return s.Err()
	}
	for _, tc := range []struct {
		reason, message string
		want            int
	}{
		{"OVERLOADED", "queue full", 4},
		{"TOO_LARGE", "about 9 MB; ask for fewer keys (or retry with backoff)", 1},
	} {
		calls = 0
		err = c.do(ctx, true, func(context.Context) error {
			calls++
			return withReason(tc.reason, tc.message)
		})
		if status.Code(err) != codes.ResourceExhausted || calls != tc.want {
			t.Fatalf("%s: %v after %d calls, want %d", tc.reason, err, calls, tc.want)
		}
	}

	// A context without a deadline gets the client's default timeout.
	timed := &Client{retry: RetryPolicy{Attempts: 1}, timeout: 30 * time.Millisecond}
	err = timed.do(ctx, true, func(ctx context.Context) error {
		if _, has := ctx.Deadline(); !has {
			return status.Error(codes.Internal, "no deadline")
		}
		<-ctx.Done()
		return status.FromContextError(ctx.Err()).Err()
	})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("default timeout: %v", err)
	}

	calls = 0
	err = c.do(ctx, true, func(context.Context) error {
		calls++
		return status.Error(codes.InvalidArgument, "bad key")
	})
	if status.Code(err) != codes.InvalidArgument || calls != 1 {
		t.Fatalf("INVALID_ARGUMENT: %v after %d calls, want 1", err, calls)
	}

	// A deadline shorter than the backoff ends the retries.
	slow := &Client{retry: RetryPolicy{Attempts: 10, Backoff: time.Hour, MaxBackoff: time.Hour}}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	calls = 0
	begin := time.Now()
	_ = slow.do(short, true, func(context.Context) error {
		calls++
		return status.Error(codes.Unavailable, "no node")
	})
	if time.Since(begin) > 5*time.Second {
		t.Fatalf("retries outlived the deadline: %v", time.Since(begin))
	}
}

// methods records the RPCs a client starts.
type methods struct {
	mu    sync.Mutex
	names map[string]int
}

func (m *methods) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.names[info.FullMethodName]++
	return ctx
}
func (m *methods) HandleRPC(context.Context, stats.RPCStats)                         {}
func (m *methods) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (m *methods) HandleConn(context.Context, stats.ConnStats)                       {}

func (m *methods) count(name string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.names[name]
}

// Single-key calls share a few Pipeline streams unless WithUnary asks for
// one call per request.
func TestCallsArePipelinedUnlessAskedOtherwise(t *testing.T) {
	node := start(t, "cache-node")
	orchestrator := start(t, "orchestrator", "--nodes", node)
	for _, unary := range []bool{false, true} {
		seen := &methods{names: map[string]int{}}
		opts := []Option{WithDialOptions(grpc.WithStatsHandler(seen))}
		if unary {
			opts = append(opts, WithUnary())
		}
		c, err := Dial(orchestrator, opts...)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		var wg sync.WaitGroup
		for w := range 10 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 10 {
					key := fmt.Sprintf("k%d-%d", w, i)
					if _, err := c.Set(ctx, key, []byte(key), 0); err != nil {
						t.Error(err)
						return
					}
					item, err := c.Get(ctx, key)
					if err != nil || string(item.Value) != key {
						t.Errorf("Get %s: %q, %v", key, item.Value, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		cancel()
		_ = c.Close()
		streams, gets := seen.count("/ringcache.v1.Cache/Pipeline"), seen.count("/ringcache.v1.Cache/Get")
		if unary && (gets != 100 || streams != 0) {
			t.Fatalf("WithUnary: %d Get calls and %d pipelines, want 100 and 0", gets, streams)
		}
		if !unary && (gets != 0 || streams == 0 || streams > 2) {
			t.Fatalf("pipelined: %d Get calls and %d pipelines, want 0 and 1-2", gets, streams)
		}
	}
}

// WithToken sends the bearer token on unary calls and on pipelines.
func TestTokensRideEveryCall(t *testing.T) {
	tokens := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(tokens, []byte("write writer-0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	node := start(t, "cache-node")
	orchestrator := start(t, "orchestrator", "--nodes", node, "--auth-tokens", tokens)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, unary := range []bool{false, true} {
		opts := []Option{WithToken("writer-0123456789abcdef")}
		anonymousOpts := []Option{}
		if unary {
			opts = append(opts, WithUnary())
			anonymousOpts = append(anonymousOpts, WithUnary())
		}
		c, err := Dial(orchestrator, opts...)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Set(ctx, "k", []byte("v"), 0); err != nil {
			t.Fatalf("unary %v: Set with the token: %v", unary, err)
		}
		if item, err := c.Get(ctx, "k"); err != nil || string(item.Value) != "v" {
			t.Fatalf("unary %v: Get with the token: %q, %v", unary, item.Value, err)
		}
		anonymous, err := Dial(orchestrator, anonymousOpts...)
		if err != nil {
			t.Fatal(err)
		}
		defer anonymous.Close()
		if _, err := anonymous.Get(ctx, "k"); status.Code(err) != codes.Unauthenticated {
			t.Fatalf("unary %v: Get without a token: %v, want Unauthenticated", unary, err)
		}
	}
}

// The connection is cut while a pipelined write and a pipelined read are
// in flight (their node hangs): the read is sent again on a new stream and
// answered; the write may have run, so it is not, and fails UNAVAILABLE.
func TestALostConnectionRepeatsReadsButNotWrites(t *testing.T) {
	node, nodeAddr := startProcess(t, "cache-node")
	orchestrator := start(t, "orchestrator", "--nodes", nodeAddr, "--node-timeout", "10s", "--health-timeout", "10s")
	p := startProxy(t, orchestrator)
	c, err := Dial(p.addr, WithPipelines(1), WithTimeout(8*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if _, err := c.Set(ctx, "r", []byte("before"), 0); err != nil {
		t.Fatal(err)
	}
	if err := node.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = node.Process.Signal(syscall.SIGCONT) }()
	waitStopped(t, node.Process.Pid)
	written := make(chan error, 1)
	read := make(chan error, 1)
	go func() {
		_, err := c.Set(ctx, "w", []byte("v"), 0)
		written <- err
	}()
	go func() {
		item, err := c.Get(ctx, "r")
		if err == nil && string(item.Value) != "before" {
			err = fmt.Errorf("read %q", item.Value)
		}
		read <- err
	}()
	time.Sleep(300 * time.Millisecond)
	p.cut()
	time.Sleep(100 * time.Millisecond)
	if err := node.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if err := <-written; status.Code(err) != codes.Unavailable {
		t.Fatalf("the write in flight: %v, want UNAVAILABLE (not sent twice)", err)
	}
	if err := <-read; err != nil {
		t.Fatalf("the read in flight: %v, want it answered on a new stream", err)
	}
	if _, err := c.Set(ctx, "after", []byte("v"), 0); err != nil {
		t.Fatalf("the client goes on: %v", err)
	}
}

// waitStopped waits until every thread of pid is stopped: kill returns
// once SIGSTOP is queued, and a thread may still answer a call meanwhile.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	tasks := fmt.Sprintf("/proc/%d/task", pid)
	for range 10000 {
		entries, err := os.ReadDir(tasks)
		stopped := err == nil
		for _, e := range entries {
			stat, err := os.ReadFile(filepath.Join(tasks, e.Name(), "stat"))
			i := strings.LastIndex(string(stat), ") ")
			if err != nil || i < 0 || i+2 >= len(stat) || (stat[i+2] != 'T' && stat[i+2] != 't') {
				stopped = false
				break
			}
		}
		if stopped {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("process %d did not stop", pid)
}
