// Command xds-client is a gRPC-Go client for conformance tests.
//
// With an xds:/// target it uses gRPC-Go's own xDS resolver; the bootstrap is
// read by gRPC from GRPC_XDS_BOOTSTRAP (a file path) or
// GRPC_XDS_BOOTSTRAP_CONFIG (inline JSON). Any other target (e.g.
// 127.0.0.1:PORT, [::1]:PORT, dns:///..., passthrough:///...) is dialed
// directly, which is useful to check the client without a control plane.
//
// Each RPC sends an empty message body (zero bytes) to -method and accepts any
// response bytes. The backend that answered is read from the response header
// x-backend-id ("unknown" when absent).
//
// Phases:
//  1. wait: RPCs are retried until the first success or until -wait has
//     elapsed. These attempts are not counted. If no RPC succeeds, all -count
//     RPCs are reported as errors (first_error is the last error seen) and no
//     more RPCs are sent.
//  2. until (only with -until-backend): RPCs are repeated until one is
//     answered by that backend, for at most -until-timeout. Not counted. If
//     the backend is not seen, a message goes to stderr and the exit code is 3.
//  3. count: -count sequential RPCs, each with -rpc-timeout; each failure
//     counts as an error.
//
// Output on stdout: {"counts": {"<backend-id>": n}, "errors": n, "first_error": "..."}.
// Exit 0 when the run completed (even with errors), 2 on flag/setup errors, 3
// when -until-backend was not seen in time.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	_ "google.golang.org/grpc/xds" // registers the xds:/// resolver and xDS balancers
)

// rawCodec passes message bytes through unchanged.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	switch m := v.(type) {
	case []byte:
		return m, nil
	case *[]byte:
		return *m, nil
	}
	return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	p, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*p = append((*p)[:0], data...)
	return nil
}

// Name is "proto" so the content-type stays application/grpc+proto.
func (rawCodec) Name() string { return "proto" }

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

type result struct {
	Counts     map[string]int `json:"counts"`
	Errors     int            `json:"errors"`
	FirstError string         `json:"first_error"`
}

func usageErr(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "xds-client: "+format+"\n", a...)
	os.Exit(2)
}

func main() {
	target := flag.String("target", "", "target, e.g. xds:///reviews.prod:9080 or 127.0.0.1:PORT (required)")
	method := flag.String("method", "/grpc.testing.TestService/UnaryCall", "full method path /package.Service/Method")
	count := flag.Int("count", 100, "number of counted RPCs")
	var md multiFlag
	flag.Var(&md, "metadata", "request metadata k=v (repeatable)")
	rpcTimeout := flag.Duration("rpc-timeout", 2*time.Second, "timeout of each RPC")
	wait := flag.Duration("wait", 30*time.Second, "retry until the first successful RPC for at most this long")
	untilBackend := flag.String("until-backend", "", "before counting, repeat RPCs until one is answered by this backend id")
	untilTimeout := flag.Duration("until-timeout", 20*time.Second, "how long to wait for -until-backend")
	flag.Parse()

	if flag.NArg() != 0 {
		usageErr("unexpected arguments: %v", flag.Args())
	}
	if *target == "" {
		usageErr("-target is required")
	}
	if !strings.HasPrefix(*method, "/") || strings.Count(*method, "/") != 2 {
		usageErr("-method must look like /package.Service/Method, got %q", *method)
	}
	if *count < 0 {
		usageErr("-count must be >= 0")
	}
	if *rpcTimeout <= 0 {
		usageErr("-rpc-timeout must be > 0")
	}
	var pairs []string
	for _, kv := range md {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			usageErr("-metadata must be k=v, got %q", kv)
		}
		pairs = append(pairs, strings.ToLower(k), v)
	}
	if strings.HasPrefix(*target, "xds:") &&
		os.Getenv("GRPC_XDS_BOOTSTRAP") == "" && os.Getenv("GRPC_XDS_BOOTSTRAP_CONFIG") == "" {
		usageErr("xds target needs GRPC_XDS_BOOTSTRAP (or GRPC_XDS_BOOTSTRAP_CONFIG) to be set")
	}
	if f := os.Getenv("GRPC_XDS_BOOTSTRAP"); f != "" && strings.HasPrefix(*target, "xds:") {
		b, err := os.ReadFile(f)
		if err != nil {
			usageErr("reading GRPC_XDS_BOOTSTRAP: %v", err)
		}
		if !json.Valid(b) {
			usageErr("GRPC_XDS_BOOTSTRAP %s is not valid JSON", f)
		}
	}

	cc, err := grpc.NewClient(*target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})),
	)
	if err != nil {
		usageErr("creating client for %q: %v", *target, err)
	}
	defer cc.Close()

	// call sends one RPC; it returns the answering backend id.
	call := func(timeout time.Duration) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		if len(pairs) > 0 {
			ctx = metadata.AppendToOutgoingContext(ctx, pairs...)
		}
		var header metadata.MD
		var resp []byte
		err := cc.Invoke(ctx, *method, []byte{}, &resp, grpc.Header(&header))
		if err != nil {
			return "", err
		}
		id := "unknown"
		if v := header.Get("x-backend-id"); len(v) > 0 {
			id = v[0]
		}
		return id, nil
	}

	res := result{Counts: map[string]int{}}
	emit := func() {
		out, _ := json.Marshal(res)
		fmt.Println(string(out))
	}

	// Phase 1: wait for the first success.
	deadline := time.Now().Add(*wait)
	var lastErr error
	ok := false
	for {
		left := time.Until(deadline)
		if left <= 0 {
			break
		}
		_, err := call(min(*rpcTimeout, left))
		if err == nil {
			ok = true
			break
		}
		lastErr = err
		time.Sleep(min(100*time.Millisecond, max(time.Until(deadline), 0)))
	}
	if !ok {
		if lastErr == nil {
			lastErr = fmt.Errorf("no RPC attempted within -wait %v", *wait)
		}
		if *untilBackend != "" {
			fmt.Fprintf(os.Stderr, "xds-client: backend %q not seen: no RPC succeeded within -wait %v: %v\n",
				*untilBackend, *wait, lastErr)
			os.Exit(3)
		}
		res.Errors = *count
		res.FirstError = fmt.Sprintf("no successful RPC within -wait %v: %v", *wait, lastErr)
		emit()
		return
	}

	// Phase 2: until the given backend answers.
	if *untilBackend != "" {
		seen := map[string]int{}
		deadline := time.Now().Add(*untilTimeout)
		found := false
		lastErr = nil
		for !found {
			left := time.Until(deadline)
			if left <= 0 {
				break
			}
			id, err := call(min(*rpcTimeout, left))
			if err != nil {
				lastErr = err
				time.Sleep(min(100*time.Millisecond, max(time.Until(deadline), 0)))
				continue
			}
			seen[id]++
			found = id == *untilBackend
			if !found {
				time.Sleep(10 * time.Millisecond) // pace while waiting for a config change
			}
		}
		if !found {
			s, _ := json.Marshal(seen)
			fmt.Fprintf(os.Stderr, "xds-client: backend %q not seen within -until-timeout %v; answered by %s; last error: %v\n",
				*untilBackend, *untilTimeout, s, lastErr)
			os.Exit(3)
		}
	}

	// Phase 3: counted RPCs.
	for i := 0; i < *count; i++ {
		id, err := call(*rpcTimeout)
		if err != nil {
			if res.Errors == 0 {
				res.FirstError = err.Error()
			}
			res.Errors++
			continue
		}
		res.Counts[id]++
	}
	emit()
}
