/* nbdc PORT NBDDEV: NBD client whose transport is a virtio-serial port (prototype of
 * "NBD over the agent channel"): newstyle handshake on the port, then a socketpair given
 * to the kernel (NBD_SET_SOCK) and relayed to the port by a child process. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>
#include <fcntl.h>
#include <poll.h>
#include <endian.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/nbd.h>
static void rd(int fd, void *b, size_t n) { size_t o = 0; while (o < n) { ssize_t r = read(fd, (char*)b + o, n - o); if (r <= 0) { perror("read"); exit(1); } o += r; } }
static void wr(int fd, const void *b, size_t n) { size_t o = 0; while (o < n) { ssize_t r = write(fd, (const char*)b + o, n - o); if (r <= 0) { perror("write"); exit(1); } o += r; } }
int main(int argc, char **argv) {
  int p = open(argv[1], O_RDWR); if (p < 0) { perror("port"); return 1; }
  char m[8]; uint16_t f16; rd(p, m, 8); rd(p, m, 8); rd(p, &f16, 2);
  uint32_t cf = htobe32(3); wr(p, &cf, 4);
  struct __attribute__((packed)) { uint64_t magic; uint32_t opt, len; } o = { htobe64(0x49484156454F5054ULL), htobe32(1), 0 };
  wr(p, &o, sizeof o);
  uint64_t size; uint16_t tf; rd(p, &size, 8); rd(p, &tf, 2); size = be64toh(size); tf = be16toh(tf);
  fprintf(stderr, "export size %llu flags 0x%x\n", (unsigned long long)size, tf);
  int sv[2]; socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  int nbd = open(argv[2], O_RDWR); if (nbd < 0) { perror("nbd"); return 1; }
  if (ioctl(nbd, NBD_SET_BLKSIZE, 4096UL) || ioctl(nbd, NBD_SET_SIZE_BLOCKS, (unsigned long)(size / 4096)) ||
      ioctl(nbd, NBD_SET_FLAGS, (unsigned long)tf) || ioctl(nbd, NBD_SET_SOCK, (unsigned long)sv[0])) { perror("ioctl"); return 1; }
  if (fork() == 0) {             /* relay socketpair <-> port */
    static char buf[1 << 17]; struct pollfd pf[2] = { { sv[1], POLLIN, 0 }, { p, POLLIN, 0 } };
    for (;;) { if (poll(pf, 2, -1) < 0) return 1;
      for (int i = 0; i < 2; i++) if (pf[i].revents & (POLLIN | POLLHUP)) {
        ssize_t r = read(pf[i].fd, buf, sizeof buf); if (r <= 0) return 0; wr(i ? sv[1] : p, buf, r); } }
  }
  close(sv[1]);
  if (ioctl(nbd, NBD_DO_IT)) perror("NBD_DO_IT");
  return 0;
}
