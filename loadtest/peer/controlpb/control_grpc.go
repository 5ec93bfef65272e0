// The PeerControl service, written by hand (protoc-gen-go-grpc would be one more
// module to fetch for one unary method). Keep in step with control.proto.

package controlpb

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// PeerControlServer is the server API for the PeerControl service.
type PeerControlServer interface {
	Update(context.Context, *UpdateRequest) (*UpdateResponse, error)
}

// UnimplementedPeerControlServer answers Unimplemented; embed it for forward compatibility.
type UnimplementedPeerControlServer struct{}

func (UnimplementedPeerControlServer) Update(context.Context, *UpdateRequest) (*UpdateResponse, error) {
	return nil, status.Error(codes.Unimplemented, "method Update not implemented")
}

func updateHandler(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	in := new(UpdateRequest)
	if err := dec(in); err != nil {
		return nil, err
	}
	return srv.(PeerControlServer).Update(ctx, in)
}

// PeerControl_ServiceDesc is the grpc.ServiceDesc for the PeerControl service.
var PeerControl_ServiceDesc = grpc.ServiceDesc{
	ServiceName: "tributary.loadtest.peer.v1.PeerControl",
	HandlerType: (*PeerControlServer)(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Update", Handler: updateHandler},
	},
	Streams:  []grpc.StreamDesc{},
	Metadata: "control.proto",
}

// RegisterPeerControlServer registers srv on s.
func RegisterPeerControlServer(s grpc.ServiceRegistrar, srv PeerControlServer) {
	s.RegisterService(&PeerControl_ServiceDesc, srv)
}
