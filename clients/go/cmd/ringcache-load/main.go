// Command ringcache-load drives Get calls through the Go client in a closed
// loop — -concurrency calls in flight for -duration — and prints one JSON
// line: calls, errors, calls/s, p50/p99 latency and this process' CPU per
// call. The comparison benchmark (scripts/bench-compare.sh) runs it next
// to its Rust client, against the same orchestrator and keys.
//
//	ringcache-load -target 127.0.0.1:50051 -concurrency 50 -duration 10s -keys 100000
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	ringcache "github.com/ringcache/ringcache/clients/go"
)

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "orchestrator address")
	concurrency := flag.Int("concurrency", 50, "calls in flight")
	duration := flag.Duration("duration", 10*time.Second, "how long to run")
	maxCalls := flag.Int("max-calls", 0, "stop after this many calls (0: no limit)")
	keys := flag.Int("keys", 100000, "read key:0 .. key:<keys-1> (as the Rust benchmark preloads them)")
	connections := flag.Int("connections", 8, "HTTP/2 connections (one Client each)")
	unary := flag.Bool("unary", false, "one unary call per Get (default: pipelined)")
	pipelines := flag.Int("pipelines", 1, "Pipeline streams per Client (without -unary)")
	direct := flag.Bool("direct", false, "direct mode: read each key from its owner node (measured once a read went directly)")
	nearBytes := flag.Uint64("near-cache-bytes", 0, "a near cache of this many bytes per Client (0: none; implies -direct)")
	flag.Parse()
	if *keys < 1 || *concurrency < 1 || *connections < 1 {
		fmt.Fprintln(os.Stderr, "ringcache-load: -keys, -concurrency and -connections must be positive")
		os.Exit(2)
	}

	clients := make([]*ringcache.Client, *connections)
	for i := range clients {
		mode := ringcache.WithPipelines(*pipelines)
		if *unary {
			mode = ringcache.WithUnary()
		}
		c, err := ringcache.Dial(*target, ringcache.WithRetryPolicy(ringcache.RetryPolicy{Attempts: 1}), mode,
			ringcache.WithDirect(*direct), ringcache.WithNearCache(*nearBytes))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		defer c.Close()
		clients[i] = c
		// Direct mode follows the topology and every feed first: measure
		// once it reads directly.
		for warm := time.Now(); (*direct || *nearBytes > 0) && c.DirectStats().Direct == 0; {
			if time.Since(warm) > 20*time.Second {
				fmt.Fprintf(os.Stderr, "ringcache-load: no read went directly in 20 s: %+v\n", c.DirectStats())
				os.Exit(1)
			}
			_, _ = c.Get(context.Background(), "key:0")
			time.Sleep(10 * time.Millisecond)
		}
	}
	var before ringcache.DirectStats
	for _, c := range clients {
		s := c.DirectStats()
		before.Direct += s.Direct
		before.Routed += s.Routed
		before.Fallbacks += s.Fallbacks
	}
	perTask := int64(-1)
	if *maxCalls > 0 {
		perTask = int64((*maxCalls + *concurrency - 1) / *concurrency)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *duration)
	defer cancel()
	cpuBefore := cpuSeconds()
	start := time.Now()
	var mu sync.Mutex
	var all []time.Duration
	errs := 0
	var wg sync.WaitGroup
	for t := 0; t < *concurrency; t++ {
		wg.Add(1)
		go func(t int) {
			defer wg.Done()
			c := clients[t%len(clients)]
			var lat []time.Duration
			failed := 0
			for i := int64(0); ctx.Err() == nil && (perTask < 0 || i < perTask); i++ {
				key := fmt.Sprintf("key:%d", (int64(t)*7919+i*104729)%int64(*keys))
				begin := time.Now()
				_, err := c.Get(context.Background(), key)
				if err == nil || errors.Is(err, ringcache.ErrCacheMiss) {
					lat = append(lat, time.Since(begin))
				} else {
					failed++
				}
			}
			mu.Lock()
			all = append(all, lat...)
			errs += failed
			mu.Unlock()
		}(t)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	cpu := cpuSeconds() - cpuBefore
	slices.Sort(all)
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[int(p*float64(len(all)-1))].Microseconds())
	}
	calls := max(len(all), 1)
	var after ringcache.DirectStats
	var nearHits uint64
	for _, c := range clients {
		s := c.DirectStats()
		after.Direct += s.Direct
		after.Routed += s.Routed
		after.Fallbacks += s.Fallbacks
		nearHits += c.NearCacheStats().Hits
	}
	_ = json.NewEncoder(os.Stdout).Encode(map[string]any{
		"calls":                len(all),
		"errors":               errs,
		"seconds":              elapsed,
		"calls_per_sec":        float64(len(all)) / elapsed,
		"p50_us":               pct(0.50),
		"p99_us":               pct(0.99),
		"client_cpu_us_per_op": cpu * 1e6 / float64(calls),
		"direct":               after.Direct - before.Direct,
		"routed":               after.Routed - before.Routed,
		"fallbacks":            after.Fallbacks - before.Fallbacks,
		"near_cache_hits":      nearHits,
	})
}
