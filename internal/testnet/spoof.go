package testnet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"runtime"
	"sync"
	"testing"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// InNS runs fn on a thread switched into the namespace at path; sockets
// created there stay in that namespace.
func InNS(path string, fn func() error) error {
	var ferr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			ferr = err
			return
		}
		defer orig.Close()
		h, err := netns.GetFromPath(path)
		if err != nil {
			ferr = err
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			ferr = err
			return
		}
		ferr = fn()
		if err := netns.Set(orig); err == nil {
			runtime.UnlockOSThread()
		}
	}()
	wg.Wait()
	return ferr
}

// Spoofer sends hand-made IPv4/UDP packets out of an interface of a
// namespace through a packet socket, as a pod with CAP_NET_RAW can: any
// source, any destination (127.0.0.1 too), straight to a MAC address,
// past the pod's own routing.
type Spoofer struct {
	fd  int
	dst unix.SockaddrLinklayer
}

// NewSpoofer opens the socket on ifname of ns, sending to dstMAC. It is
// closed at cleanup.
func NewSpoofer(t testing.TB, ns *NS, ifname string, dstMAC net.HardwareAddr) *Spoofer {
	t.Helper()
	s := &Spoofer{fd: -1}
	err := InNS(ns.Path, func() error {
		ifc, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_IP)))
		if err != nil {
			return err
		}
		s.fd = fd
		s.dst = unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: ifc.Index, Halen: uint8(len(dstMAC))}
		copy(s.dst.Addr[:], dstMAC)
		return nil
	})
	if err != nil {
		t.Fatalf("packet socket on %s in %s: %v", ifname, ns.Name, err)
	}
	t.Cleanup(func() { unix.Close(s.fd) })
	return s
}

// SendUDP sends one IPv4/UDP datagram src:sport -> dst:dport.
func (s *Spoofer) SendUDP(src, dst net.IP, sport, dport uint16, payload []byte) error {
	src4, dst4 := src.To4(), dst.To4()
	if src4 == nil || dst4 == nil {
		return errors.New("SendUDP: IPv4 addresses only")
	}
	pkt := make([]byte, 28+len(payload))
	pkt[0] = 0x45
	binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
	binary.BigEndian.PutUint16(pkt[6:], 0x4000) // DF
	pkt[8] = 64
	pkt[9] = unix.IPPROTO_UDP
	copy(pkt[12:16], src4)
	copy(pkt[16:20], dst4)
	binary.BigEndian.PutUint16(pkt[10:], ipChecksum(pkt[:20]))
	binary.BigEndian.PutUint16(pkt[20:], sport)
	binary.BigEndian.PutUint16(pkt[22:], dport)
	binary.BigEndian.PutUint16(pkt[24:], uint16(8+len(payload)))
	copy(pkt[28:], payload) // UDP checksum 0: none, valid for IPv4
	if err := unix.Sendto(s.fd, pkt, 0, &s.dst); err != nil {
		return fmt.Errorf("send %s -> %s: %w", src, dst, err)
	}
	return nil
}

func ipChecksum(h []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(h[i])<<8 | uint32(h[i+1])
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// UDPSink counts the datagrams that reach a UDP port of a namespace (any
// local address, 127.0.0.1 included), by payload.
type UDPSink struct {
	mu   sync.Mutex
	got  map[string]int
	conn net.PacketConn
}

// NewUDPSink listens on 0.0.0.0:port in ns until cleanup.
func NewUDPSink(t testing.TB, ns *NS, port int) *UDPSink {
	t.Helper()
	s := &UDPSink{got: map[string]int{}}
	err := InNS(ns.Path, func() (err error) {
		s.conn, err = net.ListenPacket("udp4", fmt.Sprintf("0.0.0.0:%d", port))
		return err
	})
	if err != nil {
		t.Fatalf("listen on udp %d in %s: %v", port, ns.Name, err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { s.conn.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, _, err := s.conn.ReadFrom(buf)
			if err != nil {
				return
			}
			s.mu.Lock()
			s.got[string(buf[:n])]++
			s.mu.Unlock()
		}
	}()
	return s
}

// Count is how many datagrams with exactly this payload arrived.
func (s *UDPSink) Count(payload string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.got[payload]
}
