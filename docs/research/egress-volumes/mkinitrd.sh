#!/bin/sh
# Tiny guest: busybox-static + virtio modules of the Debian cloud kernel.
set -e
K=6.1.0-57-cloud-amd64; M=/lib/modules/$K/kernel
R=${R17:-/tmp/research-17}/rootfs; rm -rf $R; mkdir -p $R/bin $R/mods $R/dev $R/proc $R/sys $R/mnt $R/tmp $R/etc
cp /bin/busybox $R/bin/busybox
for a in sh mount insmod ip ifconfig udhcpc wget nc ping nslookup cat echo ls mkdir dd sync umount mdev sleep date hexdump grep sed awk head tail time mkfs.ext2 df uname route telnet; do ln -sf busybox $R/bin/$a; done
for m in virtio virtio_ring virtio_mmio virtio_blk virtio_console failover net_failover virtio_net fuse virtiofs nbd vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
  f=$(find $M -name "$m.ko*" | head -1); cp $f $R/mods/; echo $m >> $R/mods/order; done
cat > $R/init <<'EOI'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for p in 1 2 3; do for m in $(cat /mods/order); do insmod /mods/$m.ko 2>/dev/null; done; done
ip link set lo up
echo GUEST-READY
# shell on the serial console; respawn
while true; do setsid sh -c 'exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1'; done
EOI
chmod +x $R/init
(cd $R && find . | cpio -o -H newc 2>/dev/null) > ${R17:-/tmp/research-17}/initrd.cpio
ls -la ${R17:-/tmp/research-17}/initrd.cpio
