// Command grpc-backend is a plain gRPC server (no xDS) for conformance tests.
//
// It accepts any method on any service and answers with an empty message body,
// setting the response header `x-backend-id: <id>` so that clients can tell
// which backend served an RPC.
//
// The first line on stdout is `LISTENING <host:port>` with the bound address.
// It serves until SIGTERM or SIGINT.
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
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

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address (host:port; [::1]:0 for IPv6)")
	id := flag.String("id", "", "backend id, sent as response header x-backend-id (required)")
	flag.Parse()
	if *id == "" || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "grpc-backend: -id is required and no positional arguments are accepted")
		flag.Usage()
		os.Exit(2)
	}

	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "grpc-backend: listen %s: %v\n", *addr, err)
		os.Exit(1)
	}

	handler := func(_ any, stream grpc.ServerStream) error {
		if err := stream.SendHeader(metadata.Pairs("x-backend-id", *id)); err != nil {
			return err
		}
		// Read the request message (unary and server-streaming send exactly one;
		// EOF means the client sent none).
		var req []byte
		if err := stream.RecvMsg(&req); err != nil && err != io.EOF {
			return err
		}
		return stream.SendMsg([]byte{})
	}

	srv := grpc.NewServer(
		grpc.UnknownServiceHandler(handler),
		grpc.ForceServerCodec(rawCodec{}),
	)

	fmt.Fprintf(os.Stdout, "LISTENING %s\n", lis.Addr().String())
	_ = os.Stdout.Sync() // os.Stdout is unbuffered; Sync fails harmlessly on pipes

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		done := make(chan struct{})
		go func() { srv.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			srv.Stop()
		}
	}()

	if err := srv.Serve(lis); err != nil {
		fmt.Fprintf(os.Stderr, "grpc-backend: serve: %v\n", err)
		os.Exit(1)
	}
}
